"""One perf workload, once, in a fresh process: its wall time and peak memory as JSON.

Peak memory is monotonic within a process, so `make perf` measures each tool's peak in a
process of its own: ``python -m perf.child --model SPEC --task TASK --inputs JSON``
prints one JSON line with

* ``max_rss_bytes``: the process's lifetime peak RSS (model load included),
* ``baseline_rss_bytes``: RSS after loading the model and setting the task up,
* ``work_peak_rss_bytes``: the largest RSS sampled while the task ran,
* ``seconds``: the task's wall time (one run: a timing, not the figure, which the parent
  takes as a median of interleaved repeats),

or ``unavailable`` with the reason when the tool cannot run here.

Special tasks: ``load.cold`` (resolve the model into a fresh temporary cache: the GGUF is
joined and converted), ``user.process`` (a user's process: warm load, capture
of the activation prompts at all layers, write and read them through the activation cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

from perf.work import (
    Inputs,
    RssSampler,
    Unavailable,
    Workloads,
    max_rss_bytes,
    perf_dtype,
    rss_bytes,
)


def _load_cold(spec: str) -> dict[str, Any]:
    from probes.models import load

    with tempfile.TemporaryDirectory(prefix="refusalbench-cold-") as tmp:
        base = rss_bytes()
        with RssSampler() as sampler:
            t0 = time.perf_counter()
            lm = load(spec, cache_dir=tmp, dtype=perf_dtype())
            seconds = time.perf_counter() - t0
        out = {"seconds": seconds, "baseline_rss_bytes": base,
               "work_peak_rss_bytes": sampler.peak, "source": lm.source}
        del lm
    return out


def _user_process(spec: str, inputs: Inputs) -> dict[str, Any]:
    from probes.cache import ActivationCache
    from probes.capture import capture
    from probes.models import load

    base = rss_bytes()
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        lm = load(spec, dtype=perf_dtype())
        t_load = time.perf_counter() - t0
        w = Workloads(lm, inputs)
        prompts = w.acts_prompts()
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="refusalbench-perf-cache-") as tmp:
            cache = ActivationCache(tmp)
            key = w.cache_key(prompts)
            acts = cache.get_or_compute(
                key, lambda: capture(lm.layout, lm.tokenizer, prompts,
                                     batch_size=inputs.batch_size))
            t_capture = time.perf_counter() - t1
            t2 = time.perf_counter()
            again = cache.get_or_compute(key, lambda: acts)
            t_read = time.perf_counter() - t2
            if cache.stats.hits != 1:
                raise RuntimeError("the activation cache did not hit on the second read")
            del again
    return {"seconds": time.perf_counter() - t0, "load_seconds": t_load,
            "capture_seconds": t_capture, "cache_read_seconds": t_read,
            "baseline_rss_bytes": base, "work_peak_rss_bytes": sampler.peak}


def _task(spec: str, task: str, inputs: Inputs) -> dict[str, Any]:
    from probes.models import load

    lm = load(spec, dtype=perf_dtype())
    w = Workloads(lm, inputs)
    if task == "acts.tl":
        w.tl_bridge(lm.model)  # in its own process the bridge may take the model itself
    fn = w.build(task)
    gc.collect()
    base = rss_bytes()
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "baseline_rss_bytes": base,
            "work_peak_rss_bytes": sampler.peak}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.child",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--inputs", default="{}", help="JSON of perf.work.Inputs")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = Inputs(**json.loads(args.inputs))
    result: dict[str, Any] = {"model": args.model, "task": args.task,
                              "torch_threads": torch.get_num_threads()}
    try:
        if args.task == "load.cold":
            result.update(_load_cold(args.model))
        elif args.task == "user.process":
            result.update(_user_process(args.model, inputs))
        else:
            result.update(_task(args.model, args.task, inputs))
    except Unavailable as exc:
        result["unavailable"] = str(exc)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    result["max_rss_bytes"] = max_rss_bytes()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
