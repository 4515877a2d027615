"""A plain diffusers training loop (UNet2DModel, DDPMScheduler, AdamW) made continual with one cdgfast method.

    python examples/diffusers_loop.py                 # digits, 2 tasks x 2 classes, about a minute on a CPU
    python examples/diffusers_loop.py --v-prediction  # the same with a v-prediction scheduler

The loop is the one every diffusers user has: the noise process is a DDPMScheduler (pass yours, with
its betas and prediction_type: cdgfast reads them), the optimizer is the user's own. The method adds
its terms to the loss and does its end-of-task work; afterwards its consolidated state is saved
without pickle (`method.save`), next to the model's own `save_pretrained`, and loaded back.
"""
import argparse
import tempfile

import torch
from diffusers import DDPMScheduler, UNet2DModel

import cdgfast.methods
from cdgfast.data import class_incremental_split, load_dataset, task_loader


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="rank1+gd")
    p.add_argument("--v-prediction", action="store_true")
    p.add_argument("--epochs", type=int, default=8)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    data = load_dataset("digits", image_size=8)
    tasks = class_incremental_split(data.y, num_tasks=2, classes_per_task=2)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, num_class_embeds=data.num_classes + 1,
                        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              prediction_type="v_prediction" if args.v_prediction else "epsilon")

    # small CPU settings, for the methods that have them (a composition's keys are "member.key")
    small = {"pool_per_class": 16, "pool_steps": 10, "fisher_max_samples": 128}
    keys = {k.rpartition(".")[2] for k in cdgfast.methods.create(args.method).config}
    method = cdgfast.methods.create(args.method, **{k: v for k, v in small.items() if k in keys})
    method.setup(num_classes=data.num_classes, schedule=scheduler, device="cpu")

    for task in tasks:
        method.begin_task(model, task)          # before building the optimizer (LoRA methods add adapters)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        loader = task_loader(data, task, batch_size=32)
        for epoch in range(args.epochs):
            for x, y in loader:
                terms = method.loss(model, {"x": x, "y": y})   # draws t/eps itself; always has "task"
                loss = sum(terms.values())
                opt.zero_grad()
                loss.backward()
                method.before_step(model)       # A-GEM would project the gradient here
                opt.step()
                method.after_step(model)        # SI would accumulate its path integral here
        print(f"task {task.index}: " + ", ".join(f"{k}={v.item():.4f}" for k, v in terms.items()))
        method.end_task(model, loader)          # rank-1 Fisher (two passes) and the GD replay pool
        method.post_task_phase(model, loader)   # only DSC does something here

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(f"{d}/unet")      # diffusers' own format (safetensors)
        method.save(f"{d}/method")              # the Fisher / anchors / replay pool: safetensors + JSON
        again = cdgfast.methods.load(f"{d}/method")
        again.setup(num_classes=data.num_classes, schedule=scheduler, device="cpu")
        print(f"saved and reloaded {again.name} after {again.task_index + 1} tasks")
    return method


if __name__ == "__main__":
    main()
