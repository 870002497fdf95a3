"""PyTorch baseline for `lookahead bench`: times the same cases on the same device in the same run.

Invoked by `lookahead bench --baseline PYTHON`, which passes the case list as JSON on stdin and reads
one JSON object back: {"torch": version, "device": name, "results": {case_name: median wall seconds},
"gpu_results": {case_name: median GPU seconds} (CUDA), "details": {...}}.
Cases the script does not know are left out (the bench then shows no ratio for them).
"""
import json
import sys
import time

import torch
import torch.nn.functional as F


_SLEEP_CYCLES_PER_SECOND = None


def sleep_cycles_per_second():
    """torch.cuda._sleep spins for a number of GPU clock cycles: calibrate cycles per second once."""
    global _SLEEP_CYCLES_PER_SECOND
    if _SLEEP_CYCLES_PER_SECOND is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_SECOND = 10_000_000 / (start.elapsed_time(end) * 1e-3)
    return _SLEEP_CYCLES_PER_SECOND


def median_time(fn, device, min_time, max_samples=200):
    """(wall, gpu) median seconds per call, timed as `lookahead bench` does: wall in batches between
    synchronisations; gpu (CUDA only, else None) the same batch queued behind torch.cuda._sleep for
    twice the host's queueing time, with events around it: the kernels without launch overhead."""
    fn()  # warm up (allocations, kernel selection)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    batch = max(1, min(1000, int(1e-3 / max(time.perf_counter() - t0, 1e-9)) + 1))
    walls, gpus = [], []
    start_all = time.perf_counter()
    while len(walls) < 3 or (time.perf_counter() - start_all < min_time and len(walls) < max_samples):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        queued = time.perf_counter() - t0
        sync(device)
        walls.append((time.perf_counter() - t0) / batch)
        if device.type == "cuda":
            hold = min(max(2 * queued, 2e-4), 0.2)
            t0 = time.perf_counter()
            torch.cuda._sleep(int(hold * sleep_cycles_per_second()))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                fn()
            end.record()
            queued = time.perf_counter() - t0
            end.synchronize()
            if queued < hold:
                gpus.append(start.elapsed_time(end) * 1e-3 / batch)
    walls.sort()
    gpus.sort()
    return walls[len(walls) // 2], (gpus[len(gpus) // 2] if gpus else None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make(case, device, dtype):
    k = case["kind"]
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    if k == "matmul":
        a, b = r(case["b"], case["m"], case["k"]), r(case["b"], case["k"], case["n"])
        return lambda: torch.matmul(a, b)
    if k == "conv2d":
        x, w = r(case["n"], case["c"], case["h"], case["w"]), r(case["k"], case["c"], case["r"], case["r"])
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
            w = w.to(memory_format=torch.channels_last)
        return lambda: F.conv2d(x, w, stride=case["stride"], padding=case["pad"])
    # Channels-last cases: NHWC memory, as the bench's (torch keeps the format through group norm).
    cl = (lambda t: t.to(memory_format=torch.channels_last)) if case.get("channels_last") else (lambda t: t)
    if k == "group_norm":
        x = cl(r(case["n"], case["c"], case["h"], case["w"]))
        wt, bs = r(case["c"]), r(case["c"])
        if case["silu"]:
            return lambda: F.silu(F.group_norm(x, case["groups"], wt, bs, 1e-5))
        return lambda: F.group_norm(x, case["groups"], wt, bs, 1e-5)
    if k == "group_norm_backward":
        x = cl(r(case["n"], case["c"], case["h"], case["w"])).requires_grad_()
        wt, bs = r(case["c"]).requires_grad_(), r(case["c"]).requires_grad_()
        y = F.group_norm(x, case["groups"], wt, bs, 1e-5)
        if case["silu"]:
            y = F.silu(y)
        dy = cl(r(*y.shape))
        return lambda: torch.autograd.grad(y, (x, wt, bs), dy, retain_graph=True)
    if k == "linear":
        x, w = r(case["m"], case["k"]), r(case["n"], case["k"])
        return lambda: F.linear(x, w)
    if k == "softmax":
        x = r(case["rows"], case["cols"])
        return lambda: torch.softmax(x, dim=-1)
    if k == "layer_norm":
        x = r(case["rows"], case["cols"])
        wt, bs = r(case["cols"]), r(case["cols"])
        return lambda: F.layer_norm(x, (case["cols"],), wt, bs, 1e-5)
    if k == "attention":
        q = r(case["b"], case["h"], case["lq"], case["d"])
        kk, v = r(case["b"], case["h"], case["lk"], case["d"]), r(case["b"], case["h"], case["lk"], case["d"])
        return lambda: F.scaled_dot_product_attention(q, kk, v)
    if k in ("flash_attention", "flash_attention_backward"):
        b, h, lq, lk, lr, d = (case[x] for x in ("b", "h", "lq", "lk", "lr", "d"))
        # [B, H, L, D] views of [B, L, H, D] memory, as diffusers splits heads (view + transpose)
        # and as our bench passes them. Keys/values as a PyTorch user runs extended attention: own
        # and reference tokens concatenated before the heads are split (outside the timed call:
        # SDPA alone is the stricter baseline).
        q = r(b, lq, h, d).transpose(1, 2)
        kc, vc = (torch.cat([r(b, lk, h, d), r(b, lr, h, d)], 1).transpose(1, 2) for _ in range(2))
        if k == "flash_attention":
            return best_sdpa_backend(case, lambda: (lambda: F.scaled_dot_product_attention(q, kc, vc)), device)
        q, kc, vc = q.requires_grad_(), kc.requires_grad_(), vc.requires_grad_()
        dout = r(b, lq, h, d).transpose(1, 2)

        def backward_of_sdpa():
            out = F.scaled_dot_product_attention(q, kc, vc)
            return lambda: torch.autograd.grad(out, (q, kc, vc), dout, retain_graph=True)

        return best_sdpa_backend(case, backward_of_sdpa, device)
    if k == "decoupled_attention":
        # IP-Adapter's attention processor: SDPA over the text tokens plus the scaled SDPA over
        # the IP tokens (the same backend for both).
        b, h, lq, l1, l2, d = (case[x] for x in ("b", "h", "lq", "l1", "l2", "d"))
        q = r(b, h, lq, d)
        k1, v1, k2, v2 = r(b, h, l1, d), r(b, h, l1, d), r(b, h, l2, d), r(b, h, l2, d)
        return best_sdpa_backend(case, lambda: (lambda: F.scaled_dot_product_attention(q, k1, v1) + 0.5 * F.scaled_dot_product_attention(q, k2, v2)), device)
    if k in ("lora_linear", "lora_linear_backward"):
        # PEFT's LoRA linear: base(x) + lora_B(lora_A(x)) * scaling.
        x, w = r(case["m"], case["k"]), r(case["n"], case["k"])
        a, bb = r(case["r"], case["k"]), r(case["n"], case["r"])
        if k == "lora_linear":
            return lambda: F.linear(x, w) + F.linear(F.linear(x, a), bb) * 0.5
        x, a, bb = x.requires_grad_(), a.requires_grad_(), bb.requires_grad_()
        y = F.linear(x, w) + F.linear(F.linear(x, a), bb) * 0.5
        dy = r(case["m"], case["n"])
        return lambda: torch.autograd.grad(y, (x, a, bb), dy, retain_graph=True)
    if k == "add":
        a, b = r(case["len"]), r(case["len"])
        return lambda: a + b
    if k == "copy":
        a = r(case["len"])
        out = torch.empty_like(a)
        return lambda: out.copy_(a)
    return None


DETAILS = {}


def best_sdpa_backend(case, build, device):
    """The fastest of SDPA's backends on this case (each timed briefly); records all in DETAILS.
    `build()` returns the function to time and is called inside the backend's context."""
    if device.type != "cuda":
        return build()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    timed = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                fn = build()
                wall, gpu = median_time(fn, device, 0.2)
                timed[backend] = gpu if gpu is not None else wall
        except RuntimeError as e:  # a backend that does not take this case
            DETAILS.setdefault(case["name"], {})[backend.name] = f"unavailable: {str(e).splitlines()[0]}"
    if not timed:
        return build()
    DETAILS.setdefault(case["name"], {}).update({b.name: f"{t * 1e3:.3f} ms" for b, t in timed.items()})
    best = min(timed, key=timed.get)
    DETAILS[case["name"]]["best"] = best.name

    def run_best():
        with sdpa_kernel(best):
            return fn_best()

    with sdpa_kernel(best):
        fn_best = build()
    return run_best


def main():
    req = json.load(sys.stdin)
    device = torch.device(req["device"])
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[req["dtype"]]
    results, gpu_results = {}, {}
    for case in req["cases"]:
        fn = make(case, device, dtype)
        if fn is not None:
            wall, gpu = median_time(fn, device, req["min_time"])
            results[case["name"]] = wall
            if gpu is not None:
                gpu_results[case["name"]] = gpu
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    json.dump({"torch": torch.__version__, "device": name, "threads": torch.get_num_threads(), "results": results, "gpu_results": gpu_results, "details": DETAILS}, sys.stdout)


if __name__ == "__main__":
    main()
