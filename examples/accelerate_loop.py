"""A cdgfast method inside a Hugging Face Accelerate training loop (the DC-score paper trained with Accelerate).

    python examples/accelerate_loop.py                                          # one process
    accelerate launch --num_processes 2 --cpu examples/accelerate_loop.py       # two processes (CPU)
    python -m torch.distributed.run --nproc_per_node 2 examples/accelerate_loop.py   # the same, via torchrun

Two processes compute what one process computes (tests/test_accelerate.py checks it):
* training: `DataLoaderConfiguration(split_batches=True)` gives each process its block of every global batch and
  averages the gradients; `method.shard_batches()` makes the method draw (t, eps) for the whole global
  batch on every process and keep its block, so each sample gets its one-process noise;
* end of task: the method gets the data-parallel context (`cdgfast.parallel.ProcessGroup()`, the
  process group Accelerate initialised) and the GLOBAL data; its Fisher estimators take each process's
  share and all-reduce the sums (cdgfast.parallel).
Only the main process saves: the model with diffusers' `save_pretrained` and the method's consolidated
state with `method.save` (safetensors + JSON).
"""
import argparse

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from diffusers import DDPMScheduler, UNet2DModel

import cdgfast.methods
from cdgfast.data import class_incremental_split, load_dataset, task_loader
from cdgfast.parallel import LOCAL, ProcessGroup


def build_model(num_classes: int) -> UNet2DModel:
    torch.manual_seed(0)  # the same initial weights in every process
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, num_class_embeds=num_classes + 1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)


def adamw(params):
    return torch.optim.AdamW(params, lr=3e-3)


def train(method_name="rank1", epochs=2, batch_size=32, steps=None, num_tasks=2, out=None, optimizer=adamw,
          **method_args):
    """The loop; `optimizer(params)` builds the user's optimizer (AdamW here)."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    data = load_dataset("digits", image_size=8)
    tasks = class_incremental_split(data.y, num_tasks=num_tasks, classes_per_task=2)
    model = build_model(data.num_classes)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    parallel = ProcessGroup() if accelerator.num_processes > 1 else LOCAL

    method = cdgfast.methods.create(method_name, **method_args)
    method.setup(num_classes=data.num_classes, schedule=scheduler, device=accelerator.device, parallel=parallel)
    method.shard_batches()  # noise for the global batch, this process's block of it

    for task in tasks:
        method.begin_task(model, task)  # before the optimizer: a LoRA method adds its adapter here
        opt = optimizer([p for p in model.parameters() if p.requires_grad])
        # the same shuffled global batches in every process; split_batches hands each its block
        rows = torch.utils.data.TensorDataset(data.x[task.indices], data.y[task.indices])
        loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(task.index))
        ddp_model, opt, shard_loader = accelerator.prepare(model, opt, loader)
        step = 0
        for epoch in range(epochs):
            for x, y in shard_loader:
                terms = method.loss(ddp_model, {"x": x, "y": y})
                opt.zero_grad()
                accelerator.backward(sum(terms.values()))   # gradients averaged over the processes
                method.before_step(model)
                opt.step()
                method.after_step(model)
                step += 1
                if steps is not None and step >= steps:
                    break
            if steps is not None and step >= steps:
                break
        accelerator.wait_for_everyone()
        # end of task on the GLOBAL data in every process; the estimators take this process's share
        global_data = task_loader(data, task, batch_size=batch_size)
        method.end_task(model, global_data)
        method.post_task_phase(model, global_data)
        if accelerator.is_main_process:
            print(f"task {task.index}: " + ", ".join(f"{k}={v.item():.4f}" for k, v in terms.items()), flush=True)
        accelerator.free_memory()  # drop the prepared wrappers; the next task prepares a new optimizer

    if out is not None and accelerator.is_main_process:
        model.save_pretrained(f"{out}/unet")
        method.save(f"{out}/method")
    accelerator.wait_for_everyone()
    return model, method, accelerator


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="rank1")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="stop each task after this many steps")
    p.add_argument("--batch-size", type=int, default=32, help="the global batch (split over the processes)")
    p.add_argument("--out", default=None, help="save the model (diffusers) and the method state here")
    p.add_argument("--sgd", type=float, default=None, metavar="LR",
                   help="plain SGD with this learning rate instead of AdamW (Adam's first steps divide by |g|, "
                        "which turns rounding-level differences of tiny gradients into steps of size lr)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a method hyperparameter, e.g. --set lam=100 (a Python literal; repeatable)")
    args = p.parse_args(argv)
    import ast

    method_args = {"fisher_max_samples": 64} if args.method in ("rank1", "diag") else {}
    for item in args.overrides:
        key, _, raw = item.partition("=")
        try:
            method_args[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            method_args[key] = raw
    opt = adamw if args.sgd is None else (lambda params: torch.optim.SGD(params, lr=args.sgd))
    train(args.method, epochs=args.epochs, batch_size=args.batch_size, steps=args.steps, out=args.out, optimizer=opt,
          **method_args)


if __name__ == "__main__":
    main()
