"""PyTorch reference for `site-agent bench`: the same architectures, loss, optimizer and timing.

Usage: python3 bench/pytorch/bench.py --config tiny|small|resnet103 --batch B --steps N
       [--size S] [--threads T] [--trainable-layers K] [--expect-params P]
       [--device cpu|cuda] [--precision fp32|tf32|bf16] [--json]

On CUDA, `--precision fp32` turns TF32 off for matmuls and cuDNN (strict fp32, as fedtune's
default), `tf32` allows it, and `bf16` runs the forward pass and loss under bf16 autocast (TF32
allowed); timings synchronise the GPU, and the peak memory is torch.cuda.max_memory_allocated.

The model mirrors site_agent::model (same layer list, same convolutions, batch norm, nearest 2x
upsampling, residual and skip wiring), trained with AdamW on cross-entropy + soft Dice on random
slices, like the Rust benchmark. `--expect-params` makes the script fail unless the parameter
count equals the Rust model's, so the two stay the same architecture.
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    # input channels (adjacent slices + 3 position channels), image_size, widths, encoder_blocks,
    # decoder_blocks (as shared::architecture)
    "tiny": (4, 32, [8, 16, 32], [1, 1, 1], [1, 1]),
    "small": (6, 48, [16, 32, 64], [1, 2, 3], [2, 1]),
    "resnet103": (6, 256, [32, 64, 128, 256], [3, 8, 24, 8], [2, 2, 2]),
}
CLASSES = 10  # background + the nine phantom organs


class Layer(nn.Module):
    def __init__(self, kind, cin, cout, stride=1, push_skip=False, cskip=0):
        super().__init__()
        self.kind, self.push_skip = kind, push_skip
        if kind == "head":
            self.conv = nn.Conv2d(cin, cout, 1, bias=True)
            self.bn = None
        else:
            k = 3
            c_in = cin + cskip if kind == "fuse" else (cout if kind == "block_out" else cin)
            self.conv = nn.Conv2d(c_in, cout, k, stride=stride if kind == "block_in" else 1, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(cout)
        self.proj = None
        if kind == "block_out" and (cin != cout or stride != 1):
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, state):
        x, residual, skips = state
        if self.kind == "stem":
            return F.relu(self.bn(self.conv(x))), residual, skips
        if self.kind == "block_in":
            if self.push_skip:
                skips = skips + [x]
            return F.relu(self.bn(self.conv(x))), x, skips
        if self.kind == "block_out":
            shortcut = self.proj(residual) if self.proj is not None else residual
            return F.relu(self.bn(self.conv(x)) + shortcut), None, skips
        if self.kind == "fuse":
            skip = skips[-1]
            up = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            return F.relu(self.bn(self.conv(torch.cat([up, skip], 1)))), residual, skips[:-1]
        return self.conv(x), residual, skips


def build(in_ch, widths, enc, dec, classes):
    layers = [Layer("stem", in_ch, widths[0])]
    c = widths[0]
    for level, (w, blocks) in enumerate(zip(widths, enc)):
        for b in range(blocks):
            opens = level > 0 and b == 0
            stride = 2 if opens else 1
            layers.append(Layer("block_in", c, w, stride=stride, push_skip=opens))
            layers.append(Layer("block_out", c, w, stride=stride))
            c = w
    for i, blocks in enumerate(dec):
        level = len(widths) - 2 - i
        w = widths[level]
        layers.append(Layer("fuse", c, w, cskip=w))
        c = w
        for _ in range(blocks):
            layers.append(Layer("block_in", c, c))
            layers.append(Layer("block_out", c, c))
    layers.append(Layer("head", c, classes))
    return nn.ModuleList(layers)


def run(layers, state, lo, hi):
    for layer in layers[lo:hi]:
        state = layer(state)
    return state


def loss_fn(logits, targets):
    c = logits.shape[1]
    onehot = F.one_hot(targets, c).permute(0, 3, 1, 2).float()
    logp = F.log_softmax(logits, 1)
    ce = -(logp * onehot).sum() / (targets.numel())
    p = logp.exp()
    inter = (p * onehot).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1.0 - dice[1:].mean())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, precision):
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def train_rate(layers, k, images, labels, batch, cache, repeat, precision="fp32"):
    """Images/s of the fastest of `repeat` timed epochs after one warm-up epoch, as site_agent::bench."""
    n_layers = len(layers)
    split = n_layers - k
    params = [p for l in layers[split:] for p in l.parameters()]
    for i, l in enumerate(layers):
        l.train(i >= split)
        for p in l.parameters():
            p.requires_grad_(i >= split)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-4)
    n = images.shape[0]

    device = images.device

    def epoch():
        sync(device)
        start = time.perf_counter()
        cached = None
        if cache and split > 0:
            with torch.no_grad(), autocast(device, precision):
                cached = [run(layers, (images[i:i + 32], None, []), 0, split) for i in range(0, n, 32)]
                xs = torch.cat([s[0] for s in cached])
                rs = torch.cat([s[1] for s in cached]) if cached[0][1] is not None else None
                sk = [torch.cat([s[2][j] for s in cached]) for j in range(len(cached[0][2]))]
        sync(device)
        cache_s = time.perf_counter() - start
        perm = torch.randperm(n, device=device)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            if cached is not None:
                state = (xs[idx], rs[idx] if rs is not None else None, [s[idx] for s in sk])
            elif split > 0:
                with torch.no_grad(), autocast(device, precision):
                    state = run(layers, (images[idx], None, []), 0, split)
            else:
                state = (images[idx], None, [])
            with autocast(device, precision):
                logits = run(layers, state, split, n_layers)[0]
                loss = loss_fn(logits.float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # As fedtune reads each step's loss (progress and divergence checks).
            loss.item()
        sync(device)
        return n / (time.perf_counter() - start - cache_s)

    epoch()
    return max(epoch() for _ in range(max(1, repeat)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny", choices=PRESETS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best counts")
    ap.add_argument("--size", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trainable-layers", type=int)
    ap.add_argument("--expect-params", type=int)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        tf32 = a.precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(1)
    in_ch, size, widths, enc, dec = PRESETS[a.config]
    size = a.size or size
    layers = build(in_ch, widths, enc, dec, CLASSES)
    n_layers = len(layers)
    k = a.trainable_layers or max(1, math.ceil(n_layers * 10 / 103))
    params = sum(p.numel() for p in layers.parameters())
    if a.expect_params is not None and params != a.expect_params:
        raise SystemExit(f"parameter count {params} differs from the Rust model's {a.expect_params}")
    n = a.batch * a.steps
    layers = layers.to(device)
    images = (torch.rand(n, in_ch, size, size) * 2 - 1).to(device)
    labels = torch.randint(0, CLASSES, (n, size, size)).to(device)
    full = train_rate(layers, n_layers, images, labels, a.batch, False, a.repeat, a.precision)
    tail = train_rate(layers, k, images, labels, a.batch, False, a.repeat, a.precision)
    cached = train_rate(layers, k, images, labels, a.batch, True, a.repeat, a.precision)
    for l in layers:
        l.eval()
    with torch.no_grad(), autocast(device, a.precision):
        run(layers, (images[:a.batch], None, []), 0, n_layers)
        ev = 0.0
        for _ in range(max(1, a.repeat)):
            sync(device)
            start = time.perf_counter()
            for i in range(0, n, a.batch):
                run(layers, (images[i:i + a.batch], None, []), 0, n_layers)
            sync(device)
            ev = max(ev, n / (time.perf_counter() - start))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_device = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    r = {
        "engine": f"pytorch {torch.__version__}", "device": a.device, "precision": a.precision,
        "peak_device_mib": peak_device,
        "config": a.config, "size": size, "batch": a.batch,
        "layers": n_layers, "trainable_layers": k, "parameters": params, "threads": torch.get_num_threads(), "repeat": max(1, a.repeat),
        "full_train_images_per_s": full, "tail_recompute_images_per_s": tail,
        "tail_cached_images_per_s": cached, "eval_slices_per_s": ev, "peak_rss_mib": peak,
    }
    if a.json:
        print(json.dumps(r))
    else:
        for key, v in r.items():
            print(f"{key:28} {v:.1f}" if isinstance(v, float) else f"{key:28} {v}")


if __name__ == "__main__":
    main()
