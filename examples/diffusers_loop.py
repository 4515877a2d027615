"""A plain diffusers training loop (UNet2DModel, DDPM noise, AdamW) made continual with one cdgfast method.

    python examples/diffusers_loop.py            # digits, 2 tasks x 2 classes, about a minute on a CPU
"""
import torch
from diffusers import UNet2DModel

import cdgfast.methods
from cdgfast.data import class_incremental_split, load_dataset, task_loader
from cdgfast.diffusion import NoiseSchedule

torch.manual_seed(0)
data = load_dataset("digits", image_size=8)
tasks = class_incremental_split(data.y, num_tasks=2, classes_per_task=2)
model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, num_class_embeds=data.num_classes + 1,
                    block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
schedule = NoiseSchedule()  # T = 1000, linear betas: the DDPM forward process

method = cdgfast.methods.create("rank1+gd", pool_per_class=16, pool_steps=10, fisher_max_samples=128)
method.setup(num_classes=data.num_classes, schedule=schedule, device="cpu")

for task in tasks:
    method.begin_task(model, task)          # before building the optimizer (LoRA methods add adapters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loader = task_loader(data, task, batch_size=32)
    for epoch in range(8):
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
