"""The workloads that `make perf` times: one function per tool and task, same inputs for all.

Every workload is built by :func:`build_task` from a :class:`Workloads` (a loaded model plus
the inputs a task needs) and returns a zero-argument callable: the setup that is not part
of the figure (booting a peer's wrapper, formatting prompts, deep copies a tool needs before
it starts) happens in ``build_task``; the callable is the measured work. The parent process
times the callables interleaved (``perf``); a child process
(``perf.child``) runs one of them once to measure its peak memory.

Tasks (``TASKS``):

* ``acts.suite``            probes.capture.capture, all layers, resid_pre, last token (no cache)
* ``acts.cache_read``       probes.cache.ActivationCache hit for the same activations
* ``acts.hidden_states``    ``model(**batch, output_hidden_states=True)`` over the same batches
* ``acts.hidden_states_1``  the same, one prompt at a time (no padding, no batching)
* ``acts.tl``               TransformerLens 4.x ``TransformerBridge.run_with_cache`` (resid_pre)
* ``acts.sv``               steering-vectors ``record_activations`` (decoder block outputs)
* ``gen.suite``             probes.interventions.steer + probes.generation.generate
* ``gen.sv``                steering-vectors ``SteeringVector.apply`` + batched ``model.generate``
* ``gen.loop``              steer + ``model.generate`` one prompt at a time (the seed's loop)
* ``abl.suite_context``     probes.abliteration.orthogonalised (edit in place, restore on exit)
* ``abl.suite_copy``        probes.abliteration.orthogonalise (an edited deep copy)
* ``abl.plain_copy``        deep copy + in-place ``W -= r r^T W`` loop over the residual writers
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.metadata
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from probes.capture import Activations, capture, left_pad_batch
from probes.generation import generate, stop_token_ids
from probes.interventions import plan_raw, steer
from probes.models import LoadedModel
from prompts import advbench, harmless

Task = Callable[[], Any]

# The names TransformerLens knows these models by (a label only: the bridge is booted from
# the already loaded HF module, nothing is downloaded).
TL_NAMES = {
    "qwen2.5-coder-0.5b-instruct": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
TASKS = (
    "acts.suite", "acts.cache_read", "acts.hidden_states", "acts.hidden_states_1", "acts.tl",
    "acts.sv", "gen.suite", "gen.sv", "gen.loop", "abl.suite_context", "abl.suite_copy",
    "abl.plain_copy",
)


class Unavailable(Exception):
    """A tool cannot run here (not installed, does not support the model): say why."""


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- prompts


def prompt_mix(n: int, seed: int) -> list[str]:
    """``n`` instructions: n - n//2 AdvBench behaviours, then n//2 English harmless ones."""
    n_harm = n - n // 2
    harm = advbench().sample(n_harm, seed, "category")
    safe = harmless().where("language", "en").sample(n // 2, seed, "topic")
    texts = [*harm.texts, *safe.texts]
    if len(texts) != n:
        raise ValueError(f"asked for {n} prompts, the packaged sets give {len(texts)}")
    return texts


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> int:
    """This process's peak RSS since it started (``VmHWM``).

    Not ``getrusage().ru_maxrss``: on Linux that survives ``exec`` and so reports the parent's
    RSS at fork time for a child process started by ``subprocess``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RssSampler:
    """Samples this process's RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval = interval_s
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, int(proc.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """What the tasks of one comparison need; JSON-serialisable for the child processes."""

    n_prompts: int = 32  # activation prompts
    seed: int = 0
    batch_size: int = 32
    n_gen: int = 8  # steered-generation prompts
    new_tokens: int = 16
    layer: int = 1  # steering layer (input of this block)
    alpha: float = 0.5  # raw units: alpha times the mean-difference vector
    direction_path: str = ""  # torch.save'd [L, d] mean-difference directions
    cache_root: str = ""  # activation cache root holding acts.suite's entry

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Workloads:
    """A loaded model and the inputs of one comparison; builds tasks by name."""

    lm: LoadedModel
    inputs: Inputs
    precomputed: Activations | None = None  # acts.suite's result, to fill the cache entry
    _tl: Any = field(default=None, repr=False)
    _directions: torch.Tensor | None = field(default=None, repr=False)

    # -- shared inputs ---------------------------------------------------------------
    def acts_prompts(self) -> list[str]:
        return self.lm.format(prompt_mix(self.inputs.n_prompts, self.inputs.seed))

    def gen_prompts(self) -> list[str]:
        return self.lm.format(prompt_mix(self.inputs.n_gen, self.inputs.seed + 1))

    def directions(self) -> torch.Tensor:
        if self._directions is None:
            if not self.inputs.direction_path:
                raise ValueError("this task needs a direction file (Inputs.direction_path)")
            self._directions = torch.load(self.inputs.direction_path, weights_only=True)
        return self._directions

    def cache_key(self, prompts: Sequence[str]) -> Any:
        import hashlib

        from probes.cache import CacheKey

        sha = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()
        return CacheKey(self.lm.fingerprint, sha, "resid_pre", "last",
                        tuple(range(self.lm.n_layers)), str(self.lm.dtype), "perf")

    def batches(self, prompts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """The suite's batching: sorted by length (longest first), left-padded, batch_size."""
        tok = self.lm.tokenizer
        lengths = [len(x) for x in tok(list(prompts), add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        bs = self.inputs.batch_size
        return [left_pad_batch(tok, [prompts[i] for i in order[s:s + bs]], self.lm.device)
                for s in range(0, len(order), bs)]

    # -- tasks -------------------------------------------------------------------------
    def build(self, name: str) -> Task:
        """The measured callable for task ``name``; raises :class:`Unavailable` with a reason."""
        builders: dict[str, Callable[[], Task]] = {
            "acts.suite": self._acts_suite, "acts.cache_read": self._acts_cache_read,
            "acts.hidden_states": self._acts_hidden_states,
            "acts.hidden_states_1": self._acts_hidden_states_1, "acts.tl": self._acts_tl,
            "acts.sv": self._acts_sv, "gen.suite": self._gen_suite, "gen.sv": self._gen_sv,
            "gen.loop": self._gen_loop, "abl.suite_context": self._abl_suite_context,
            "abl.suite_copy": self._abl_suite_copy, "abl.plain_copy": self._abl_plain_copy,
        }
        if name not in builders:
            raise ValueError(f"unknown task {name!r}; choose one of {', '.join(builders)}")
        return builders[name]()

    def _acts_suite(self) -> Task:
        prompts, lm, bs = self.acts_prompts(), self.lm, self.inputs.batch_size
        return lambda: capture(lm.layout, lm.tokenizer, prompts, batch_size=bs).data

    def _acts_cache_read(self) -> Task:
        from probes.cache import ActivationCache

        if not self.inputs.cache_root:
            raise ValueError("acts.cache_read needs Inputs.cache_root")
        prompts = self.acts_prompts()
        key = self.cache_key(prompts)
        cache = ActivationCache(self.inputs.cache_root)
        lm, bs, pre = self.lm, self.inputs.batch_size, self.precomputed

        def compute() -> Activations:
            if pre is not None:
                return pre
            return capture(lm.layout, lm.tokenizer, prompts, batch_size=bs)

        cache.get_or_compute(key, compute)  # make sure the entry exists (setup)

        def read() -> torch.Tensor:
            hits = cache.stats.hits
            data = cache.get_or_compute(key, compute).data
            if cache.stats.hits != hits + 1:
                raise RuntimeError("the activation cache missed: the read figure is invalid")
            return data

        return read

    def _acts_hidden_states(self) -> Task:
        batches = self.batches(self.acts_prompts())
        model, n_layers = self.lm.model, self.lm.n_layers
        order = self._sorted_order(self.acts_prompts())

        @torch.inference_mode()
        def run() -> torch.Tensor:
            rows = []
            for batch in batches:
                hs = model(**batch, output_hidden_states=True).hidden_states
                rows.append(torch.stack([hs[i][:, -1] for i in range(n_layers)], 1).float())
            return _unsort(torch.cat(rows), order)

        return run

    def _acts_hidden_states_1(self) -> Task:
        tok, model, n_layers = self.lm.tokenizer, self.lm.model, self.lm.n_layers
        device = self.lm.device
        ids = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
               for p in self.acts_prompts()]

        @torch.inference_mode()
        def run() -> torch.Tensor:
            rows = []
            for x in ids:
                hs = model(input_ids=x, output_hidden_states=True).hidden_states
                rows.append(torch.stack([hs[i][0, -1] for i in range(n_layers)]).float())
            return torch.stack(rows)

        return run

    def tl_bridge(self, model: Any | None = None) -> Any:
        """A TransformerLens bridge around a copy of the model (booting mutates the module
        tree it is given: wrappers, eager attention), so the suite's model stays untouched."""
        if self._tl is None:
            try:
                from transformer_lens.model_bridge import TransformerBridge
            except Exception as exc:
                raise Unavailable(f"transformer-lens is not importable ({type(exc).__name__}: "
                                  f"{exc}); `make perf` installs it") from exc
            hf = copy.deepcopy(self.lm.model) if model is None else model
            name = TL_NAMES.get(self.lm.name, self.lm.name)
            try:
                with contextlib.redirect_stdout(None):
                    self._tl = TransformerBridge.boot_transformers(
                        name, hf_model=hf, tokenizer=self.lm.tokenizer,
                        device=str(self.lm.device), dtype=self.lm.dtype)
            except Exception as exc:
                raise Unavailable(f"TransformerBridge.boot_transformers({name!r}, hf_model=...) "
                                  f"failed: {type(exc).__name__}: {exc}") from exc
        return self._tl

    def release_tl(self) -> None:
        self._tl = None
        gc.collect()

    def _acts_tl(self) -> Task:
        bridge = self.tl_bridge()
        prompts = self.acts_prompts()
        batches = self.batches(prompts)
        order = self._sorted_order(prompts)
        n_layers = self.lm.n_layers
        names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]

        @torch.inference_mode()
        def run() -> torch.Tensor:
            rows = []
            for batch in batches:
                _, cache = bridge.run_with_cache(
                    batch["input_ids"], attention_mask=batch["attention_mask"],
                    names_filter=names, pos_slice=-1)
                rows.append(torch.stack([cache[n][:, -1] for n in names], 1).float())
            return _unsort(torch.cat(rows), order)

        return run

    def _acts_sv(self) -> Task:
        sv = _import_sv()
        prompts = self.acts_prompts()
        batches = self.batches(prompts)
        order = self._sorted_order(prompts)
        model, n_layers = self.lm.model, self.lm.n_layers

        @torch.inference_mode()
        def run() -> torch.Tensor:
            rows = []
            for batch in batches:
                with sv.record_activations(model, layer_type="decoder_block") as rec:
                    model(**batch)
                # record_activations reads block outputs: block l's output is resid_pre l + 1.
                rows.append(torch.stack([rec[i][0][:, -1] for i in range(n_layers)], 1).float())
            return _unsort(torch.cat(rows), order)

        return run

    def _steer_plan(self) -> Any:
        layer = self.inputs.layer
        return plan_raw({layer: self.directions()[layer]}, self.inputs.alpha)

    def _gen_suite(self) -> Task:
        prompts, lm, n = self.gen_prompts(), self.lm, self.inputs.new_tokens
        plan, bs = self._steer_plan(), self.inputs.batch_size

        def run() -> Any:
            with steer(lm.layout, plan):
                return generate(lm.model, lm.tokenizer, prompts, n, batch_size=bs)

        return run

    def _gen_sv(self) -> Task:
        sv = _import_sv()
        layer = self.inputs.layer
        if layer < 1:
            raise Unavailable("steering-vectors patches block outputs: layer 0's input has no "
                              "preceding block")
        vec = sv.SteeringVector({layer - 1: self.directions()[layer].clone()}, "decoder_block")
        prompts = self.gen_prompts()
        batches = self.batches(prompts)
        order = self._sorted_order(prompts)
        model: Any = self.lm.model  # a transformers model: generate() is not typed on nn.Module
        tok, n, alpha = self.lm.tokenizer, self.inputs.new_tokens, self.inputs.alpha
        stops = stop_token_ids(model, tok)
        pad = tok.pad_token_id

        @torch.inference_mode()
        def run() -> list[str]:
            texts: list[str] = []
            with vec.apply(model, multiplier=alpha):
                for batch in batches:
                    out = model.generate(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=stops,
                        pad_token_id=pad, temperature=None, top_p=None, top_k=None)
                    width = batch["input_ids"].shape[1]
                    texts += [_decode(tok, row, stops) for row in out[:, width:].tolist()]
            return [texts[i] for i in _inverse(order)]

        return run

    def _gen_loop(self) -> Task:
        lm, n, plan = self.lm, self.inputs.new_tokens, self._steer_plan()
        tok = lm.tokenizer
        model: Any = lm.model  # a transformers model: generate() is not typed on nn.Module
        stops = stop_token_ids(model, tok)
        ids = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(lm.device)
               for p in self.gen_prompts()]

        @torch.inference_mode()
        def run() -> list[str]:
            texts = []
            with steer(lm.layout, plan):
                for x in ids:
                    out = model.generate(
                        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                        do_sample=False, num_beams=1, eos_token_id=stops,
                        pad_token_id=tok.pad_token_id, temperature=None, top_p=None,
                        top_k=None)
                    texts.append(_decode(tok, out[0, x.shape[1]:].tolist(), stops))
            return texts

        return run

    def abl_direction(self) -> torch.Tensor:
        return self.directions()[self.inputs.layer]

    def _abl_suite_context(self) -> Task:
        from probes.abliteration import orthogonalised

        lm, r = self.lm, self.abl_direction()

        def run() -> float:
            with orthogonalised(lm.layout, r, model=lm.model):
                return _max_writer_projection(lm, r)

        return run

    def _abl_suite_copy(self) -> Task:
        from probes.abliteration import orthogonalise

        lm, r = self.lm, self.abl_direction()

        def run() -> float:
            edited = orthogonalise(lm.model, r)
            from probes.layout import find_layout

            residual = _max_projection(find_layout(edited), r)
            del edited
            return residual

        return run

    def _abl_plain_copy(self) -> Task:
        lm, r = self.lm, self.abl_direction()
        base = getattr(lm.model, "model", None)
        blocks = getattr(base, "layers", [])
        if not blocks or not all(hasattr(b, "self_attn") and hasattr(b.self_attn, "o_proj")
                                 and hasattr(b, "mlp") and hasattr(b.mlp, "down_proj")
                                 for b in blocks):
            raise Unavailable("the plain baseline edits model.layers[i].self_attn.o_proj and "
                              ".mlp.down_proj, which this architecture does not have")

        @torch.no_grad()
        def run() -> float:
            # What an abliteration notebook does: copy, then edit the usual HF modules.
            edited: Any = copy.deepcopy(lm.model)
            emb = edited.get_input_embeddings().weight  # [vocab, d]
            u = (r.float() / r.float().norm()).to(emb.dtype)  # in the weights' dtype
            emb -= torch.outer(emb @ u, u)
            for block in edited.model.layers:
                for mod in (block.self_attn.o_proj, block.mlp.down_proj):
                    w = mod.weight  # [d, d_in]
                    w -= torch.outer(u, u @ w)
                    if mod.bias is not None:
                        mod.bias -= (mod.bias @ u) * u
            from probes.layout import find_layout

            residual = _max_projection(find_layout(edited), r)
            del edited
            return residual

        return run

    def _sorted_order(self, prompts: Sequence[str]) -> list[int]:
        tok = self.lm.tokenizer
        lengths = [len(x) for x in tok(list(prompts), add_special_tokens=False)["input_ids"]]
        return sorted(range(len(prompts)), key=lambda i: -lengths[i])


def _import_sv() -> Any:
    try:
        import steering_vectors
    except Exception as exc:
        raise Unavailable(f"steering-vectors is not importable ({type(exc).__name__}: {exc}); "
                          "`make perf` installs it with --no-deps") from exc
    return steering_vectors


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for pos, original in enumerate(order):
        inv[original] = pos
    return inv


def _unsort(rows: torch.Tensor, order: list[int]) -> torch.Tensor:
    return rows[torch.tensor(_inverse(order))]


def _decode(tok: Any, ids: list[int], stops: list[int]) -> str:
    cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
    return str(tok.decode(ids[:cut], skip_special_tokens=True))


def _max_projection(layout: Any, r: torch.Tensor) -> float:
    """Largest |component along r| over every residual writer: ~0 after an abliteration."""
    u = (r / r.norm()).to(torch.float32)
    worst = 0.0
    for w in layout.writers:
        p = w.param.detach().float().movedim(w.out_axis, -1)
        worst = max(worst, float((p @ u).abs().max()))
    return worst


def _max_writer_projection(lm: LoadedModel, r: torch.Tensor) -> float:
    return _max_projection(lm.layout, r)


# --------------------------------------------------------------------------- timing


def timed(task: Task) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = task()
    return time.perf_counter() - t0, out


def interleaved(tasks: dict[str, Task], repeats: int,
                progress: Callable[[str], None]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run every task once per round, rounds in the same order (ABAB...), ``repeats`` rounds.

    Returns the seconds per task and each task's last output (for parity checks).
    """
    seconds: dict[str, list[float]] = {k: [] for k in tasks}
    outputs: dict[str, Any] = {}
    for r in range(repeats):
        for name, task in tasks.items():
            dt, outputs[name] = timed(task)
            seconds[name].append(dt)
            progress(f"  round {r + 1}/{repeats} {name}: {dt:.2f}s")
    return seconds, outputs


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


DTYPE_ENV = "REFUSALBENCH_PERF_DTYPE"


def perf_dtype() -> str:
    """The dtype every model of the run is loaded in (``--dtype``; children inherit it)."""
    from probes.models import dtype_name, parse_dtype

    return dtype_name(parse_dtype(os.environ.get(DTYPE_ENV, "auto")))


def matmul_gflops(size: int, repeats: int) -> list[float]:
    """``torch.matmul`` of two ``size``-square matrices in the run's dtype, GFLOP/s per repeat."""
    from probes.models import parse_dtype

    dt = parse_dtype(perf_dtype())
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dt)
    b = torch.randn(size, size, generator=gen).to(dt)
    out = torch.empty(size, size, dtype=dt)
    torch.matmul(a, b, out=out)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        rates.append(2.0 * size**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def environment_threads() -> dict[str, str | None]:
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE")
    return {k: os.environ.get(k) for k in keys}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
