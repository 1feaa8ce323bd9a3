"""`make perf`: how fast the suite is, against its targets and against peer tools.

    python -m perf [--model SPEC ...] [--quick] [--sections a,b,...]
                              [--repeats N] [--out reports/out/perf.json] [--no-memory]

Sections (default: all but ``doseresponse``):

* ``load`` (foundation): model load cold (GGUF joined and converted into a fresh temporary
  cache, in a child process; skipped with --quick) and warm (from the safetensors cache).
* ``activations`` (foundation): all-layer last-token activations of 128 AdvBench + harmless
  prompts: ``probes.capture.capture`` (no activation cache) vs a plain
  ``model(**batch, output_hidden_states=True)`` loop over the same batches, interleaved;
  a warm read of the same activations through ``probes.cache.ActivationCache``; the peak
  RSS of a fresh process doing warm load + capture + cache write/read.
* ``generation`` (throughput): greedy ``probes.generation.generate`` throughput (new tokens/s)
  at batch sizes 1, 8, 32, 64 (48 new tokens), the batch-32/batch-1 speed-up and a roofline:
  the machine's matmul GFLOP/s in the run's dtype (--dtype, default auto) over the
  model's FLOPs per token (2 x parameters,
  lm_head included) is the compute-bound tokens/s; each throughput is given as a fraction.
* ``doseresponse`` (generation, opt-in, minutes): the default 17-alpha dose-response workload
  (17 alphas x 40 prompts x 48 new tokens, steering layers L/3..2L/3 with the mean-difference
  direction) end to end.
* ``compare-acts`` (peers): 256 prompts, all layers, last token: the suite cold and warm vs
  TransformerLens ``run_with_cache``, steering-vectors ``record_activations`` and a plain
  one-prompt-at-a-time ``output_hidden_states`` loop; interleaved, medians, ratios
  (suite / peer), parity of the activations, peak RSS per tool in a child process.
* ``compare-steer`` (peers): steered greedy generation, 40 prompts x 48 new tokens, one
  layer: the suite vs steering-vectors ``SteeringVector.apply`` + batched ``model.generate``
  vs a one-prompt-at-a-time loop; same outputs checked.
* ``abliteration`` (peers): orthogonalising every residual writer of every layer:
  ``probes.abliteration.orthogonalised`` (in place, restored) and ``orthogonalise`` (copy)
  vs a plain deep copy + in-place edit loop; wall time and peak RSS.
* ``bench-profile`` (opt-in, no model): where a ``make bench`` run spent its time, read from
  its JSON report (``--bench-report``, default ``reports/out/report.json``): seconds per
  benchmark module in model loading, prompt passes (prefill), generation (decode), judging and
  the rest (statistics). Printed as a table and written under ``bench_profile`` in the JSON.

Everything is measured in one process, interleaved (ABAB...), median over ``--repeats``;
peak memory per tool in a separate child process doing the same work once. Writes
``reports/out/perf.json`` and prints a table. Timings depend on the machine and on what
else runs on it: the JSON records the CPU, torch threads and the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probes.progress import Progress

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("load", "activations", "generation", "doseresponse", "compare-acts",
            "compare-steer", "abliteration", "bench-profile")
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s not in ("doseresponse", "bench-profile"))
MODEL_SECTIONS = tuple(s for s in SECTIONS if s != "bench-profile")
DEFAULT_BENCH_REPORT = REPO / "reports" / "out" / "report.json"
DEFAULT_MODELS = ("default", "smollm2-135m-instruct")
DEFAULT_OUT = REPO / "reports" / "out" / "perf.json"


@dataclass(frozen=True)
class Settings:
    """Sizes of every workload; ``--quick`` shrinks them."""

    quick: bool
    repeats: int
    load_repeats: int
    n_acts: int  # foundation section: activation prompts
    n_compare: int  # peer comparison: activation prompts
    batch_size: int
    gen_batch_sizes: tuple[int, ...]
    gen_bs1_prompts: int
    new_tokens: int
    n_steer: int
    steer_alpha: float
    dose_alphas: str
    dose_per_class: int
    matmul_sizes: tuple[int, ...]
    matmul_repeats: int
    cold_load: bool
    memory: bool
    seed: int = 0

    @classmethod
    def make(cls, quick: bool, repeats: int | None, memory: bool, cold_load: bool | None
             ) -> Settings:
        if quick:
            return cls(quick=True, repeats=repeats or 1, load_repeats=max(1, repeats or 1),
                       n_acts=32, n_compare=32, batch_size=32, gen_batch_sizes=(1, 8, 32),
                       gen_bs1_prompts=2, new_tokens=16, n_steer=8, steer_alpha=0.5,
                       dose_alphas="-1,0,1", dose_per_class=4, matmul_sizes=(2048,),
                       matmul_repeats=3, cold_load=bool(cold_load), memory=memory)
        from fixtures.options import PROFILES

        full = PROFILES["full"]  # the generation workloads are sized like `make bench`
        return cls(quick=False, repeats=repeats or 3, load_repeats=max(3, repeats or 3),
                   n_acts=128, n_compare=256, batch_size=64, gen_batch_sizes=(1, 8, 32, 64),
                   gen_bs1_prompts=4, new_tokens=full.max_new_tokens, n_steer=40,
                   steer_alpha=0.5, dose_alphas=full.alphas, dose_per_class=full.n_gen,
                   matmul_sizes=(2048, 3072, 4096),
                   matmul_repeats=5, cold_load=cold_load is not False, memory=memory)


def perf_dtype() -> str:
    from perf.work import perf_dtype as dtype

    return dtype()


def _parse_sections(values: Sequence[str] | None) -> tuple[str, ...]:
    if not values:
        return DEFAULT_SECTIONS
    chosen: list[str] = []
    for v in values:
        for s in v.split(","):
            s = s.strip()
            if not s:
                continue
            if s == "all":
                chosen += SECTIONS
                continue
            if s not in SECTIONS:
                raise argparse.ArgumentTypeError(
                    f"unknown section {s!r}; choose from {', '.join(SECTIONS)} or all")
            chosen.append(s)
    return tuple(s for s in SECTIONS if s in chosen)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m perf",
        description="Timing and memory of the suite against its targets and peer tools.",
        epilog="sections: " + ", ".join(SECTIONS)
        + " (default: all but doseresponse and bench-profile)")
    p.add_argument("--model", action="append", dest="models", metavar="SPEC",
                   help="model alias, .gguf or HF directory; repeatable "
                        f"(default: {' and '.join(DEFAULT_MODELS)})")
    p.add_argument("--quick", action="store_true",
                   help="small workloads, one repeat, no cold load (a smoke run)")
    p.add_argument("--sections", action="append", metavar="LIST",
                   help="comma-separated sections to run (repeatable; 'all' for every one)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats per timing (default 3, 1 with --quick)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON path ({DEFAULT_OUT})")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the child processes that measure peak memory per tool")
    p.add_argument("--cold-load", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the cold (GGUF) load (default: on, off with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--bench-report", type=Path, default=DEFAULT_BENCH_REPORT,
                   help="the `make bench` JSON report the bench-profile section reads "
                        f"(default {DEFAULT_BENCH_REPORT})")
    p.add_argument("--dtype", default="auto",
                   help="dtype of every model and of the matmul roofline (default auto, as the "
                        "benchmark suite: bfloat16 on CPUs with AVX512-BF16/AMX, else float32)")
    return p


# --------------------------------------------------------------------------- helpers


def _child(spec: str, task: str, inputs: Any, progress: Progress, threads: int | None,
           timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run ``perf.child`` for one task; its JSON result (or an error entry)."""
    cmd = [sys.executable, "-m", "perf.child", "--model", spec, "--task", task,
           "--inputs", json.dumps(inputs.as_json() if hasattr(inputs, "as_json") else inputs)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    progress(f"  child process: {task}")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"child process timed out after {timeout_s:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-5:]
        return {"error": f"child process exited {proc.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _memory_figure(report: Any, fid: str, section: str, label: str, res: dict[str, Any],
                   target: Any = None) -> None:
    from perf.report import GIB, Figure

    if "unavailable" in res or "error" in res:
        status = "unavailable" if "unavailable" in res else "error"
        report.add(Figure(fid, section, label, None, "bytes", status=status,
                          note=res.get("unavailable") or res.get("error", "")))
        return
    extra: dict[str, Any] = {k: res[k] for k in ("baseline_rss_bytes", "work_peak_rss_bytes",
                                                 "seconds", "max_rss_bytes") if k in res}
    # The weights are memory-mapped safetensors, paged in (and counted in RSS) when first
    # used: RSS before the task is not "the model", so the peak is reported whole.
    report.add(Figure(fid, section, label, float(res["max_rss_bytes"]), "bytes", target=target,
                      note=f"peak of a fresh process doing it once, load included (RSS before "
                           f"the task {res['baseline_rss_bytes'] / GIB:.2f} GiB, peak during the "
                           f"task {res.get('work_peak_rss_bytes', 0) / GIB:.2f} GiB)",
                      extra=extra))


def _directions(lm: Any, acts: Any | None, n: int, seed: int, batch_size: int,
                progress: Progress) -> Any:
    """Mean-difference directions [L, d] (resid_pre, last token): harmful minus harmless.

    ``acts`` [n, L, d] from a prompt_mix (first half harmful) is reused when given.
    """
    import torch

    from perf.work import prompt_mix
    from probes.capture import capture

    if acts is None:
        progress(f"  capturing {n} prompts for the steering direction")
        prompts = lm.format(prompt_mix(n, seed + 2))
        acts = capture(lm.layout, lm.tokenizer, prompts, batch_size=batch_size).data
        n_harm = n - n // 2
    else:
        n_harm = acts.shape[0] - acts.shape[0] // 2
    d: torch.Tensor = acts[:n_harm].mean(0) - acts[n_harm:].mean(0)
    return d.contiguous()


def dose_layers(n_layers: int) -> list[int]:
    """The middle third, as the seed's layers 8-15 of 24."""
    lo, hi = round(n_layers / 3), round(2 * n_layers / 3)
    return list(range(lo, max(hi, lo + 1)))


# --------------------------------------------------------------------------- the run


class Run:
    """State of one `make perf` run: settings, output, the shared roofline."""

    def __init__(self, settings: Settings, sections: tuple[str, ...], threads: int | None,
                 progress: Progress, tmp: Path) -> None:
        self.s = settings
        self.sections = sections
        self.threads = threads
        self.progress = progress
        self.tmp = tmp
        self.roofline: dict[str, Any] | None = None

    # -- roofline ----------------------------------------------------------------------
    def measure_roofline(self) -> dict[str, Any]:
        from perf.report import median
        from perf.work import matmul_gflops

        if self.roofline is None:
            per_size: dict[str, dict[str, Any]] = {}
            for size in self.s.matmul_sizes:
                rates = matmul_gflops(size, self.s.matmul_repeats)
                per_size[str(size)] = {"samples": rates, "median": median(rates)}
                self.progress(f"  {perf_dtype()} matmul {size}^2: {median(rates):.1f} GFLOP/s")
            best = max(per_size, key=lambda k: per_size[k]["median"])
            self.roofline = {"gflops": per_size[best]["median"], "best_size": int(best),
                             "dtype": perf_dtype(),
                             "per_size": per_size, "repeats": self.s.matmul_repeats,
                             "definition": "median over repeats of 2 n^3 / t for torch.matmul "
                                           f"of two {perf_dtype()} n x n matrices; the best size "
                                           "counts"}
        return self.roofline

    # -- one model ---------------------------------------------------------------------
    def model(self, spec: str) -> Any:
        from perf.report import ModelReport
        from probes.models import load

        report = ModelReport(spec)
        p = self.progress
        p(f"== {spec}")
        lm = None
        if "load" in self.sections:
            lm = self.section_load(spec, report)
        if lm is None:
            lm = load(spec, dtype=perf_dtype())
        n_params = sum(t.numel() for t in lm.model.parameters())
        report.info = {
            "name": lm.name, "display_name": lm.info.get("display_name", lm.name),
            "fingerprint": lm.fingerprint, "n_layers": lm.n_layers,
            "d_model": lm.layout.d_model, "n_params": n_params, "dtype": str(lm.dtype),
            "flops_per_token": 2 * n_params,
            "flops_definition": "2 x parameters (unique tensors, lm_head and embedding "
                                "included): the matmul work of one token, attention ignored",
        }
        state: dict[str, Any] = {"acts": None, "directions_path": None}
        self._warmup(lm)
        gc.collect()
        gc.freeze()  # the collections between timed runs then skip the long-lived heap
        for section in self.sections:
            if section in ("load", "bench-profile"):  # load ran first; the profile reads a report
                continue
            fn: Callable[[Any, Any, Any, dict[str, Any]], None] = {
                "activations": self.section_activations, "generation": self.section_generation,
                "doseresponse": self.section_doseresponse,
                "compare-acts": self.section_compare_acts,
                "compare-steer": self.section_compare_steer,
                "abliteration": self.section_abliteration,
            }[section]
            p(f"-- {spec}: {section}")
            t0 = time.perf_counter()
            fn(spec, lm, report, state)
            p(f"-- {spec}: {section} done in {time.perf_counter() - t0:.0f}s")
        del lm
        gc.unfreeze()
        gc.collect()
        return report

    def _warmup(self, lm: Any) -> None:
        import torch

        with torch.inference_mode():
            ids = lm.tokenizer(lm.format(["Hello"]), return_tensors="pt",
                               add_special_tokens=False)["input_ids"].to(lm.device)
            lm.model(input_ids=ids)

    def _direction_file(self, spec: str, lm: Any, state: dict[str, Any]) -> str:
        import torch

        if state["directions_path"] is None:
            d = _directions(lm, state["acts"], 32 if not self.s.quick else 8, self.s.seed,
                            self.s.batch_size, self.progress)
            path = self.tmp / f"directions-{abs(hash(spec))}.pt"
            torch.save(d, path)
            state["directions_path"] = str(path)
        return str(state["directions_path"])

    # -- A: foundation (load, capture, cache, memory) -----------------------------------
    def section_load(self, spec: str, report: Any) -> Any:
        from perf.report import Figure, Target, median
        from probes.models import load

        p = self.progress
        if spec.startswith("tiny-") or (Path(spec).is_dir()):
            report.add(Figure("load.cold_s", "load", "load cold (GGUF -> safetensors)", None,
                              "s", status="skipped",
                              note="no GGUF behind this model: nothing to convert"))
        elif not self.s.cold_load:
            report.add(Figure("load.cold_s", "load", "load cold (GGUF -> safetensors)", None,
                              "s", status="skipped", note="--quick (or --no-cold-load)"))
        else:
            p("  cold load in a child process (fresh temporary cache: join + convert)")
            res = _child(spec, "load.cold", {}, p, self.threads)
            if "seconds" in res:
                report.add(Figure("load.cold_s", "load", "load cold (GGUF -> safetensors)",
                                  res["seconds"], "s", samples=[res["seconds"]],
                                  note="fresh temporary cache dir, one run in a child process"))
                _memory_figure(report, "load.cold_peak_rss", "load", "peak RSS, cold load",
                               res)
            else:
                report.add(Figure("load.cold_s", "load", "load cold (GGUF -> safetensors)",
                                  None, "s", status="error", note=res.get("error", "")))
        p("  warm loads (safetensors cache)")
        lm = load(spec, dtype=perf_dtype())  # converts once if the cache is empty; not timed
        samples = []
        for i in range(self.s.load_repeats):
            del lm
            gc.collect()
            t0 = time.perf_counter()
            lm = load(spec, dtype=perf_dtype())
            samples.append(time.perf_counter() - t0)
            p(f"  warm load {i + 1}/{self.s.load_repeats}: {samples[-1]:.2f}s")
        report.add(Figure("load.warm_s", "load", "load warm (safetensors cache)",
                          median(samples), "s", samples=samples,
                          target=Target("<", 3.0, "warm load"),
                          note="in a process that has loaded it before (imports warm)"))
        return lm

    def section_activations(self, spec: str, lm: Any, report: Any, state: dict[str, Any]
                            ) -> None:
        from perf.report import GIB, Figure, Target, median
        from perf.work import Inputs, Workloads, interleaved
        from probes.capture import Activations

        s, p = self.s, self.progress
        inputs = Inputs(n_prompts=s.n_acts, seed=s.seed, batch_size=s.batch_size,
                        cache_root=str(self.tmp / f"cache-a-{abs(hash(spec))}"))
        w = Workloads(lm, inputs)
        tasks = {"suite": w.build("acts.suite"), "hidden_states": w.build("acts.hidden_states")}
        p(f"  {s.n_acts} prompts, all {lm.n_layers} layers, last token, batch {s.batch_size}")
        secs, outs = interleaved(tasks, s.repeats, p)
        n = s.n_acts
        report.add(Figure("acts.suite_s", "activations",
                          f"capture, {n} prompts, all layers (no cache)", median(secs["suite"]),
                          "s", samples=secs["suite"],
                          note="probes.capture.capture: decoder only, stops after the "
                               "deepest layer"))
        report.add(Figure("acts.hidden_states_s", "activations",
                          f"output_hidden_states loop, same {n} prompts/batches",
                          median(secs["hidden_states"]), "s", samples=secs["hidden_states"],
                          note="model(**batch, output_hidden_states=True), full model"))
        ratio = median(secs["suite"]) / median(secs["hidden_states"])
        diff = float((outs["suite"] - outs["hidden_states"]).abs().max())
        report.add(Figure("acts.suite_over_hidden_states", "activations",
                          "capture / output_hidden_states (time)", ratio, "x",
                          target=Target("<=", 1.0, "hooks add no cost"),
                          note=f"same activations: max |diff| {diff:.1e}",
                          extra={"max_abs_diff": diff}))
        data = outs["suite"]
        acts = Activations("resid_pre", "last", tuple(range(lm.n_layers)), data)
        state["acts"] = data
        w.precomputed = acts
        read = w.build("acts.cache_read")
        samples, _ = interleaved({"cache_read": read}, max(5, s.repeats), p)
        report.add(Figure("acts.cache_read_s", "activations",
                          f"activation cache read ({n} x {lm.n_layers} x {lm.layout.d_model})",
                          median(samples["cache_read"]), "s", samples=samples["cache_read"],
                          target=Target("<", 0.5, "cache read"),
                          note="ActivationCache.get_or_compute hit (read + checksum)"))
        if s.memory:
            res = _child(spec, "user.process", inputs, p, self.threads)
            _memory_figure(report, "acts.process_peak_rss", "activations",
                           "peak RSS: load + capture + cache write/read", res,
                           Target("<", 6 * GIB, "memory"))
            if "load_seconds" in res:
                report.add(Figure("load.warm_fresh_process_s", "activations",
                                  "load warm in a fresh process (imports included)",
                                  res["load_seconds"], "s", samples=[res["load_seconds"]],
                                  target=Target("<", 3.0, "warm load"),
                                  note="one run, in the peak-RSS child process"))

    # -- B: generation ---------------------------------------------------------------------
    def section_generation(self, spec: str, lm: Any, report: Any, state: dict[str, Any]
                           ) -> None:
        from perf.report import Figure, Target, median
        from perf.work import interleaved, prompt_mix
        from probes.generation import generate

        s, p = self.s, self.progress
        roof = self.measure_roofline()
        flops = report.info["flops_per_token"]
        bound = roof["gflops"] * 1e9 / flops
        report.add(Figure("gen.flops_per_token", "generation", "model FLOPs per token",
                          flops / 1e9, "GFLOP", note="2 x parameters incl. lm_head"))
        report.add(Figure("gen.matmul_gflops", "generation", f"{perf_dtype()} matmul (machine)",
                          roof["gflops"], "GFLOP/s",
                          samples=roof["per_size"][str(roof["best_size"])]["samples"],
                          note=f"torch.matmul {roof['best_size']}^2, median"))
        report.add(Figure("gen.compute_bound_tok_s", "generation", "compute-bound tokens/s",
                          bound, "tok/s", note="matmul GFLOP/s / FLOPs per token"))
        tasks: dict[str, Callable[[], Any]] = {}
        prompt_tokens: dict[int, int] = {}
        for bs in s.gen_batch_sizes:
            n = s.gen_bs1_prompts if bs == 1 else bs
            prompts = lm.format(prompt_mix(n, s.seed + 3))
            prompt_tokens[bs] = sum(len(x) for x in lm.tokenizer(
                prompts, add_special_tokens=False)["input_ids"])

            def task(prompts: list[str] = prompts, bs: int = bs) -> Any:
                return generate(lm.model, lm.tokenizer, prompts, s.new_tokens, batch_size=bs)

            tasks[f"batch {bs}"] = task
        p(f"  greedy generation, {s.new_tokens} new tokens, batch sizes {s.gen_batch_sizes}")
        rates: dict[str, list[float]] = {k: [] for k in tasks}
        new_tokens: dict[str, list[int]] = {k: [] for k in tasks}
        for r in range(s.repeats):
            secs, outs = interleaved(tasks, 1, p)
            for k in tasks:
                rates[k].append(outs[k].total_new_tokens / secs[k][0])
                new_tokens[k].append(outs[k].total_new_tokens)
            del outs
            p(f"  round {r + 1}: " + ", ".join(f"{k} {rates[k][-1]:.1f} tok/s" for k in tasks))
        tok_s: dict[int, float] = {}
        for bs in s.gen_batch_sizes:
            k = f"batch {bs}"
            tok_s[bs] = median(rates[k])
            n = s.gen_bs1_prompts if bs == 1 else bs
            new_total = median(new_tokens[k])
            # The same run counted with its prompt tokens (prefill is work too).
            with_prompt = tok_s[bs] * (new_total + prompt_tokens[bs]) / max(new_total, 1)
            report.add(Figure(f"gen.bs{bs}_tok_s", "generation",
                              f"generate batch {bs} ({n} prompts x {s.new_tokens} new)",
                              tok_s[bs], "tok/s", samples=rates[k],
                              note=f"{100 * tok_s[bs] / bound:.1f} % of compute-bound; "
                                   f"{100 * with_prompt / bound:.0f} % counting the "
                                   f"{prompt_tokens[bs]} prompt tokens",
                              extra={"fraction_of_compute_bound": tok_s[bs] / bound,
                                     "prompt_tokens": prompt_tokens[bs],
                                     "new_tokens": new_tokens[k],
                                     "fraction_incl_prompt_tokens": with_prompt / bound}))
        for bs in s.gen_batch_sizes:
            if bs == 32:
                report.add(Figure("gen.bs32_fraction", "generation",
                                  "batch 32 throughput / compute-bound", tok_s[32] / bound,
                                  "fraction", target=Target(">=", 0.5, "generation"),
                                  note="new tokens only; prompt prefill is extra work"))
        if 1 in tok_s and 32 in tok_s:
            report.add(Figure("gen.speedup_bs32_over_bs1", "generation",
                              "throughput batch 32 / batch 1", tok_s[32] / tok_s[1], "x",
                              target=Target(">=", 6.0, "batching")))

    def section_doseresponse(self, spec: str, lm: Any, report: Any, state: dict[str, Any]
                             ) -> None:
        import torch

        from fixtures.options import parse_alphas
        from perf.report import Figure
        from perf.work import prompt_mix
        from probes.generation import generate
        from probes.interventions import plan_raw, steer

        s, p = self.s, self.progress
        alphas = parse_alphas(s.dose_alphas).values
        layers = dose_layers(lm.n_layers)
        dirs = torch.load(self._direction_file(spec, lm, state), weights_only=True)
        prompts = lm.format(prompt_mix(2 * s.dose_per_class, s.seed + 4))
        p(f"  {len(alphas)} alphas x {len(prompts)} prompts x {s.new_tokens} new tokens, "
          f"layers {layers[0]}-{layers[-1]}")
        t0 = time.perf_counter()
        tokens = 0
        for i, alpha in enumerate(alphas):
            plan = plan_raw({layer: dirs[layer] for layer in layers}, alpha)
            with steer(lm.layout, plan):
                g = generate(lm.model, lm.tokenizer, prompts, s.new_tokens,
                             batch_size=s.batch_size)
            tokens += g.total_new_tokens
            p(f"  alpha {alpha:+.2f} ({i + 1}/{len(alphas)}): {g.seconds:.1f}s, "
              f"{time.perf_counter() - t0:.0f}s so far")
        wall = time.perf_counter() - t0
        n_gen = len(alphas) * len(prompts)
        label = (f"dose-response: {len(alphas)} alphas x {len(prompts)} prompts x "
                 f"{s.new_tokens} tokens")
        report.add(Figure("dose.wall_s", "doseresponse", label, wall, "s", samples=[wall],
                          note=("reduced (--quick); " if s.quick else "")
                          + f"{n_gen} generations, {tokens} new tokens, "
                            f"{tokens / wall:.1f} tok/s; seed: 3,860 s for 280 generations",
                          extra={"generations": n_gen, "new_tokens": tokens,
                                 "alphas": list(alphas), "layers": layers}))

    # -- C: peers ------------------------------------------------------------------------
    def section_compare_acts(self, spec: str, lm: Any, report: Any, state: dict[str, Any]
                             ) -> None:
        from perf.report import Figure, Target, median, per_round, per_round_note
        from perf.work import Inputs, Unavailable, Workloads, interleaved
        from probes.capture import Activations

        s, p = self.s, self.progress
        n = s.n_compare
        sec = "compare-acts"
        inputs = Inputs(n_prompts=n, seed=s.seed, batch_size=s.batch_size,
                        cache_root=str(self.tmp / f"cache-c-{abs(hash(spec))}"))
        w = Workloads(lm, inputs)
        names = {"suite": "acts.suite", "transformer-lens": "acts.tl",
                 "steering-vectors": "acts.sv", "hidden_states 1-by-1": "acts.hidden_states_1"}
        tasks: dict[str, Callable[[], Any]] = {}
        missing: dict[str, str] = {}
        for label, task in names.items():
            t0 = time.perf_counter()
            try:
                tasks[label] = w.build(task)
            except Unavailable as exc:
                missing[label] = str(exc)
                p(f"  {label}: unavailable: {exc}")
                continue
            if task == "acts.tl":
                report.add(Figure("cmp.acts.tl_boot_s", sec,
                                  "TransformerLens bridge boot (setup, not timed below)",
                                  time.perf_counter() - t0, "s",
                                  note="boot_transformers(hf_model=deep copy): eager attention"))
        p(f"  {n} prompts, all layers, last token; interleaved x {s.repeats}")
        secs, outs = interleaved(tasks, s.repeats, p)
        w.release_tl()
        suite = outs["suite"]
        w.precomputed = Activations("resid_pre", "last", tuple(range(lm.n_layers)), suite)
        if state["acts"] is None:
            state["acts"] = suite
        reads, _ = interleaved({"cache": w.build("acts.cache_read")}, max(5, s.repeats), p)
        t_cold, t_warm = median(secs["suite"]), median(reads["cache"])
        report.add(Figure("cmp.acts.suite_cold_s", sec, f"suite cold, {n} prompts",
                          t_cold, "s", samples=secs["suite"], note="capture, cache disabled"))
        report.add(Figure("cmp.acts.suite_warm_s", sec, f"suite warm, {n} prompts",
                          t_warm, "s", samples=reads["cache"], note="activation cache read"))
        report.add(Figure("cmp.acts.warm_over_cold", sec, "suite warm / suite cold",
                          t_warm / t_cold, "x", target=Target("<=", 1 / 20, "warm cache 20x")))
        notes = {
            "transformer-lens": "TransformerBridge.run_with_cache(names_filter=resid_pre, "
                                "pos_slice=-1), same batches",
            "steering-vectors": "record_activations (block outputs, cloned), same batches, "
                                "full forward",
            "hidden_states 1-by-1": "model(ids, output_hidden_states=True) per prompt",
        }
        keys = {"transformer-lens": "tl", "steering-vectors": "sv",
                "hidden_states 1-by-1": "hidden_states_1"}
        for label, key in keys.items():
            fid = f"cmp.acts.{key}"
            if label in missing:
                report.add(Figure(fid + "_s", sec, f"{label}, {n} prompts", None, "s",
                                  status="unavailable", note=missing[label]))
                continue
            out = outs[label]
            if key == "sv":  # block l's output = resid_pre of block l + 1
                diff = float((out[:, :-1] - suite[:, 1:]).abs().max())
            else:
                diff = float((out - suite).abs().max())
            t_peer = median(secs[label])
            report.add(Figure(fid + "_s", sec, f"{label}, {n} prompts", t_peer, "s",
                              samples=secs[label],
                              note=f"max |diff| vs suite {diff:.1e}; " + notes[label],
                              extra={"max_abs_diff_vs_suite": diff}))
            goal = {"tl": Target("<=", 1 / 1.5, "1.5x faster"),
                    "sv": Target("<=", 1.0, "as fast")}.get(key)
            rounds = per_round(secs["suite"], secs[label])
            report.add(Figure(fid + "_ratio_cold", sec, f"suite cold / {label}",
                              t_cold / t_peer, "x", target=goal,
                              note="time ratio, < 1: the suite is faster"
                                   + per_round_note(rounds),
                              extra={"per_round": rounds}))
            report.add(Figure(fid + "_ratio_warm", sec, f"suite warm / {label}",
                              t_warm / t_peer, "x"))
        del outs, tasks
        gc.collect()
        if s.memory:
            for label, task in (("suite cold", "acts.suite"), ("suite warm", "acts.cache_read"),
                                ("transformer-lens", "acts.tl"),
                                ("steering-vectors", "acts.sv"),
                                ("hidden_states 1-by-1", "acts.hidden_states_1")):
                res = _child(spec, task, inputs, p, self.threads)
                _memory_figure(report, f"cmp.acts.peak_rss.{task.split('.')[1]}", sec,
                               f"peak RSS, {label}", res)

    def section_compare_steer(self, spec: str, lm: Any, report: Any, state: dict[str, Any]
                              ) -> None:
        from perf.report import Figure, Target, median, per_round, per_round_note
        from perf.work import Inputs, Unavailable, Workloads, interleaved

        s, p = self.s, self.progress
        sec = "compare-steer"
        layer = lm.n_layers // 2
        inputs = Inputs(seed=s.seed, batch_size=s.batch_size, n_gen=s.n_steer,
                        new_tokens=s.new_tokens, layer=layer, alpha=s.steer_alpha,
                        direction_path=self._direction_file(spec, lm, state))
        w = Workloads(lm, inputs)
        names = {"suite": "gen.suite", "steering-vectors": "gen.sv",
                 "1-by-1 loop": "gen.loop"}
        tasks: dict[str, Callable[[], Any]] = {}
        missing: dict[str, str] = {}
        for label, task in names.items():
            try:
                tasks[label] = w.build(task)
            except Unavailable as exc:
                missing[label] = str(exc)
        p(f"  steered generation: {s.n_steer} prompts x {s.new_tokens} new tokens, layer "
          f"{layer}, alpha {s.steer_alpha} (raw); interleaved x {s.repeats}")
        secs, outs = interleaved(tasks, s.repeats, p)
        t_suite = median(secs["suite"])
        gens = outs["suite"]
        outs["suite"] = gens.texts
        report.add(Figure("cmp.steer.suite_s", sec,
                          f"suite: steer + generate ({s.n_steer} x {s.new_tokens})", t_suite,
                          "s", samples=secs["suite"],
                          note=f"batch {s.batch_size}: "
                               f"{-(-s.n_steer // s.batch_size)} batch(es) of up to "
                               f"{min(s.batch_size, s.n_steer)}"))
        roof = self.measure_roofline()
        bound = roof["gflops"] * 1e9 / report.info["flops_per_token"]
        rates = [gens.total_new_tokens / t for t in secs["suite"]]
        report.add(Figure("cmp.steer.suite_fraction", sec,
                          "suite steered tokens/s / compute-bound", median(rates) / bound,
                          "fraction", target=Target(">=", 0.30, "steered throughput"),
                          note=f"{median(rates):.0f} tok/s ({gens.total_new_tokens} new tokens; "
                               f"prompt prefill is extra work) / {bound:.0f} tok/s"))
        notes = {"steering-vectors": "SteeringVector.apply + model.generate, same batches",
                 "1-by-1 loop": "steer + model.generate per prompt (the seed's loop)"}
        for label, key in (("steering-vectors", "sv"), ("1-by-1 loop", "loop")):
            fid = f"cmp.steer.{key}"
            if label in missing:
                report.add(Figure(fid + "_s", sec, label, None, "s", status="unavailable",
                                  note=missing[label]))
                continue
            same = sum(a == b for a, b in zip(outs["suite"], outs[label], strict=True))
            t_peer = median(secs[label])
            report.add(Figure(fid + "_s", sec, label, t_peer, "s", samples=secs[label],
                              note=f"same text as the suite {same}/{len(outs['suite'])}; "
                                   + notes[label],
                              extra={"same_text": same, "n": len(outs["suite"])}))
            goal = Target("<=", 1.0 if key == "sv" else 0.1,
                          "as fast" if key == "sv" else "10x the loop")
            rounds = per_round(secs["suite"], secs[label])
            report.add(Figure(fid + "_ratio", sec, f"suite / {label}", t_suite / t_peer, "x",
                              target=goal, note="time ratio, < 1: the suite is faster"
                                                + per_round_note(rounds),
                              extra={"per_round": rounds}))
        del outs, tasks
        gc.collect()
        if s.memory:
            for label, task in (("suite", "gen.suite"), ("steering-vectors", "gen.sv"),
                                ("1-by-1 loop", "gen.loop")):
                res = _child(spec, task, inputs, p, self.threads)
                _memory_figure(report, f"cmp.steer.peak_rss.{task.split('.')[1]}", sec,
                               f"peak RSS, {label}", res)

    def section_abliteration(self, spec: str, lm: Any, report: Any, state: dict[str, Any]
                             ) -> None:
        from perf.report import Figure, median
        from perf.work import Inputs, Workloads, interleaved

        s, p = self.s, self.progress
        sec = "abliteration"
        try:
            import probes.abliteration  # noqa: F401
        except ImportError as exc:
            report.add(Figure("abl.suite_context_s", sec, "abliteration", None, "s",
                              status="unavailable", note=f"probes.abliteration: {exc}"))
            return
        layer = lm.n_layers // 2
        inputs = Inputs(seed=s.seed, layer=layer,
                        direction_path=self._direction_file(spec, lm, state))
        w = Workloads(lm, inputs)
        tasks = {"orthogonalised": w.build("abl.suite_context"),
                 "orthogonalise": w.build("abl.suite_copy"),
                 "plain": w.build("abl.plain_copy")}
        p(f"  orthogonalise every writer of all {lm.n_layers} layers (+ embedding); "
          f"direction of layer {layer}; interleaved x {s.repeats}")
        secs, outs = interleaved(tasks, s.repeats, p)
        labels = {
            "orthogonalised": ("abl.suite_context", "suite orthogonalised (in place, restored)"),
            "orthogonalise": ("abl.suite_copy", "suite orthogonalise (edited deep copy)"),
            "plain": ("abl.plain_copy", "plain: deep copy + in-place W -= r r^T W"),
        }
        for k, (fid, label) in labels.items():
            report.add(Figure(fid + "_s", sec, label, median(secs[k]), "s", samples=secs[k],
                              note=f"max |r.W| after the edit {outs[k]:.1e}",
                              extra={"max_residual_projection": outs[k]}))
        t_plain = median(secs["plain"])
        report.add(Figure("abl.suite_context_ratio", sec, "suite orthogonalised / plain",
                          median(secs["orthogonalised"]) / t_plain, "x"))
        report.add(Figure("abl.suite_copy_ratio", sec, "suite orthogonalise / plain",
                          median(secs["orthogonalise"]) / t_plain, "x"))
        if s.memory:
            for label, task in (("suite orthogonalised", "abl.suite_context"),
                                ("suite orthogonalise", "abl.suite_copy"),
                                ("plain copy + edit", "abl.plain_copy")):
                res = _child(spec, task, inputs, p, self.threads)
                _memory_figure(report, f"abl.peak_rss.{task.split('.')[1]}", sec,
                               f"peak RSS, {label}", res)


def bench_profile(report: Path) -> dict[str, Any]:
    """The ``profile`` of a ``make bench`` JSON report with its table rows, or an entry
    with ``error`` saying why there is none (no report, not a report, no profile in it)."""
    from reports.document import ReportError, load_report
    from reports.profile import profile_rows

    if not report.is_file():
        return {"report": str(report), "error": f"no report at {report}: run `make bench` "
                "first, or pass --bench-report PATH"}
    try:
        doc = load_report(report)
    except ReportError as exc:
        return {"report": str(report), "error": str(exc)}
    profile = doc.get("profile")
    if not profile or not profile.get("modules"):
        return {"report": str(report), "error": f"{report} holds no time profile (written "
                "before profiling existed, or no test finished): rerun `make bench`"}
    headers, rows = profile_rows(profile)
    return {"report": str(report), "complete": doc.get("complete"), "profile": profile,
            "table": {"headers": headers, "rows": rows}}


def _profile_text(entry: dict[str, Any]) -> str:
    """The bench-profile entry as printed lines."""
    from reports.profile import profile_table

    if "error" in entry:
        return f"\n== bench-profile: not available: {entry['error']}\n"
    partial = "" if entry.get("complete") else " (incomplete run)"
    return (f"\n== bench-profile: {entry['report']}{partial}, seconds by module and kind "
            f"of work\n{profile_table(entry['profile'])}\n")


def _write_json(out: Path, doc: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp_out.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp_out, out)


def _profile_only(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``--sections bench-profile`` alone: read the report, no model, no timing run."""
    from perf.report import now_iso

    entry = bench_profile(Path(args.bench_report))
    doc = {"schema": "refusalbench-perf/1", "date": now_iso(),
           "command": "python -m perf " + " ".join(sys.argv[1:] if argv is None else argv),
           "sections": ["bench-profile"], "bench_profile": entry}
    _write_json(Path(args.out), doc)
    sys.stdout.write(_profile_text(entry))
    sys.stdout.write(f"\nwrote {args.out}\n")
    return 1 if "error" in entry else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sections = _parse_sections(args.sections)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if sections == ("bench-profile",):
        return _profile_only(args, argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from perf.work import DTYPE_ENV
    from probes.models import dtype_name, parse_dtype

    try:
        dtype = dtype_name(parse_dtype(args.dtype))
    except ValueError as exc:
        parser.error(str(exc))
    os.environ[DTYPE_ENV] = dtype  # child processes load in the same dtype ("auto" resolved)

    from perf.report import machine_info, now_iso, render_table, target_text
    from perf.work import max_rss_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    models = tuple(args.models or DEFAULT_MODELS)
    settings = Settings.make(args.quick, args.repeats, not args.no_memory, args.cold_load)
    progress = Progress(every_s=0.0, label="perf")
    doc: dict[str, Any] = {
        "schema": "refusalbench-perf/1", "date": now_iso(),
        "command": "python -m perf " + " ".join(sys.argv[1:] if argv is None
                                                           else argv),
        "quick": settings.quick, "sections": list(sections), "settings": settings.__dict__,
        "machine": machine_info(torch.get_num_threads()),
    }
    progress(f"models {', '.join(models)}; sections {', '.join(sections)}; "
             f"repeats {settings.repeats}{' (quick)' if settings.quick else ''}")
    reports = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="refusalbench-perf-") as tmp:
        run = Run(settings, sections, args.threads, progress, Path(tmp))
        for spec in models:
            reports.append(run.model(spec))
        doc["roofline"] = run.roofline
    doc["wall_seconds"] = time.perf_counter() - t0
    doc["process_max_rss_bytes"] = max_rss_bytes()
    with contextlib.suppress(OSError):
        doc["load_average_at_end"] = list(os.getloadavg())
    doc["models"] = {r.spec: r.as_json() for r in reports}
    if "bench-profile" in sections:
        doc["bench_profile"] = bench_profile(Path(args.bench_report))
    doc["targets"] = [
        {"model": r.spec, "figure": f.id, "value": f.value, "target": target_text(f),
         "met": f.met}
        for r in reports for f in r.figures.values() if f.target is not None]
    out = Path(args.out)
    _write_json(out, doc)
    sys.stdout.write(render_table(doc, reports))
    if "bench_profile" in doc:
        sys.stdout.write(_profile_text(doc["bench_profile"]))
    sys.stdout.write(f"\nwrote {out} ({doc['wall_seconds']:.0f}s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
