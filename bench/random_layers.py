"""What makes two_pass blow up when phase 2 draws its own random masks (replay switched off).

    python bench/random_layers.py     # ~3 min on 2 CPU cores; prints one line per configuration

autobatch.demo.models' StochasticNet (inverted-residual blocks, 5x5 depthwise convolutions, a dropout
before a BatchNorm1d head), float64, logical batch 16, 12x12 inputs, 3 seeds. Per configuration: the
first step's gradient norm divided by the full batch's with the same masks, with autobatch's
replay of random draws and its check against phase 1 switched off, i.e. as autobatch behaved before.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import contextlib
import copy
import itertools
import logging

import torch
import torch.nn as nn

import autobatch
from autobatch.demo.models import StochasticNet

logging.getLogger("autobatch").setLevel(logging.ERROR)
ce = nn.CrossEntropyLoss()
torch.set_num_threads(1)
def ratio(blocks, mb, seed, survival, drop2d, replay=False):
    torch.manual_seed(seed)
    m = StochasticNet(blocks=blocks).double()
    for b in m.blocks:
        b.survival = survival
    if not drop2d:
        import types
        def fwd(self, x, F=torch.nn.functional):
            br = F.silu(self.bn1(self.expand(x)))
            br = F.silu(self.bn2(self.depthwise(br)))
            br = self.bn3(self.project(br))
            if self.training and self.survival < 1:
                keep = torch.empty([x.shape[0],1,1,1], dtype=x.dtype).bernoulli_(self.survival)
                br = br * keep.div_(self.survival)
            return x + br
        for b in m.blocks: b.forward = types.MethodType(fwd, b)
    x = torch.randn(16,3,12,12,dtype=torch.float64); y=torch.randint(0,5,(16,))
    full = copy.deepcopy(m); torch.manual_seed(1); ce(full(x),y).backward()
    fn = torch.cat([p.grad.flatten() for p in full.parameters()]).norm().item()
    g=[]
    ab = autobatch.wrap(m, torch.optim.SGD(m.parameters(), lr=0.0), 16, ce, micro_batch=mb, cache=False,
       phase1_memory_format=torch.preserve_format, before_step=lambda ab: g.append(torch.cat([p.grad.flatten() for p in ab.model.parameters()]).norm().item()))
    if not replay: ab._strategy.draws.record = lambda *a: contextlib.nullcontext()  # nothing to replay
    ab._strategy.check = lambda: None
    torch.manual_seed(1)
    try: ab.step(x,y)
    except Exception: return float("nan")
    return g[0]/fn
for blocks, survival, drop2d, mb in itertools.product((2, 4, 8, 16), (1.0, 0.7), (False, True), (2, 4)):
    if survival == 1.0 and not drop2d: continue
    rs = [ratio(blocks, mb, s, survival, drop2d) for s in range(3)]
    print(f"blocks {blocks:2d} survival {survival} dropout2d {drop2d!s:5} micro {mb}: max ratio {max(rs):.3g}  ({', '.join(f'{r:.2g}' for r in rs)})", flush=True)
