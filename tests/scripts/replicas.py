"""Started by tests/test_distributed.py under torchrun: a short DMD2 image distillation through the library call the
labs use (build_distillation + fit), then every rank's generator and critic parameters gathered on rank 0 and
compared bitwise. Usage: replicas.py OUT_DIR RESULT_JSON name=value ..."""
import json
import sys

import torch
import torch.distributed as dist

from dmd2lab import image_recipe as recipe
from dmd2lab.cli import _settings

torch.set_num_threads(1)
out_dir, result = sys.argv[1], sys.argv[2]
run = recipe.build_distillation(recipe.load_config("distill", None, _settings(sys.argv[3:])), out_dir)
run.trainer.fit()
flat = torch.cat([p.detach().reshape(-1) for name in ("generator", "critic")
                  for p in run.trainer.players[name].module.parameters()])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    json.dump({"world_size": dist.get_world_size(), "parameters": flat.numel(),
               "identical": all(torch.equal(gathered[0], g) for g in gathered[1:]),
               "max_difference": max(float((gathered[0] - g).abs().max()) for g in gathered[1:])}, open(result, "w"))
dist.destroy_process_group()
