"""``svdq eval``: the paper's quality protocol on a finished quantization — generate a benchmark's prompts with
the 16-bit model, the run's quantized model and each baseline at the same seeds, then score them (FID against
real images, ImageReward, LPIPS/PSNR/SSIM against 16-bit, CLIP score) into ``RUN/eval/report.{json,md}`` and
``grid.png``.

Generation is the long part, so it is resumable per image (:mod:`.images`) and shared by torchrun ranks
(prompt i on rank i mod N, each writing its own PNGs); rank 0 scores once every rank is done. Scoring reads
the PNGs back a batch at a time, so 5,000 samples at 1024 px need no more memory than one batch.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from ..calibration.prompts import prompt_seed
from ..errors import BadInputError
from ..methods.baselines import baseline_fields
from ..models.resolution import Resolution
from ..run.directory import Run, library_versions
from ..run.recipe import RunConfig
from ..runtime.kernels import describe
from ..stages.report_images import png_bytes, sheet
from ..stages.validate import baseline_layers, quantized_block
from ..stages.workspace import Workspace
from ..system.distributed import World
from ..system.progress import say, task
from ..version import __version__
from . import benchmarks, metrics, report
from .images import ImageStore

REFERENCE = "16-bit"
CHUNK = 8  # prompts encoded at once: bounded memory for the encodings
STAGE = "eval"  # the manifest record of the report files


@dataclasses.dataclass(frozen=True)
class Options:
    benchmark: str
    num_samples: int | None
    metrics: str | None  # comma-separated; None: every metric that loads
    clip_model: str
    seed: int


def evaluate(run: Run, config: RunConfig, options: Options, world: World) -> dict:
    """Generate what is missing, then (rank 0) score and write the report; returns the report's entry."""
    workspace = Workspace(config, run.path / "cache", world, cache_encodings=False)
    benchmark = benchmarks.load(options.benchmark, options.num_samples, run.path / "cache")
    names, explicit = metrics.parse(options.metrics)
    unusable = _unusable(names, explicit, benchmark, options.benchmark)
    suite = _load_metrics([name for name in names if name not in unusable], explicit, workspace.device,
                          options.clip_model, world)
    steps, guidance, resolution = workspace.settings(config.validation)
    settings = {"steps": steps, "guidance": guidance, "resolution": resolution, "seed": options.seed}
    seeds = [prompt_seed(p, options.seed) for p in benchmark.prompts]
    methods = list(dict.fromkeys([REFERENCE, config.quant.method, *config.validation.baselines]))
    store = ImageStore(run.path / "eval" / "images", _fingerprints(run, config, methods))
    image_settings = {key: settings[key] for key in ("steps", "guidance", "resolution")}
    keys = {method: [store.key(method, p, s, image_settings) for p, s in zip(benchmark.prompts, seeds, strict=True)]
            for method in methods}
    start = time.perf_counter()
    for method in methods:
        _generate(workspace, run, config, store, method, keys[method], benchmark.prompts, seeds, world)
    world.barrier("the end of the evaluation's generation")
    if not world.leader:
        return {}
    generated = time.perf_counter() - start
    entry = _score(suite, benchmark, store, keys, methods, resolution)
    entry.update(benchmark=options.benchmark, prompts=benchmark.prompts, seeds=seeds, settings=settings,
                 runtime=describe(workspace.device), device=workspace.device,
                 skipped={**unusable, **suite.skipped},
                 folders={method: f"eval/images/{method}" for method in methods},
                 files={method: [f"{key}.png" for key in keys[method]] for method in methods},
                 seconds={"generation": round(generated, 1),
                          "scoring": round(time.perf_counter() - start - generated, 1)},
                 versions={**library_versions(), "svdq": __version__})
    _write_report(run, config, entry, benchmark, store, keys, methods, resolution)
    return entry


def _unusable(names: list[str], explicit: bool, benchmark: benchmarks.Benchmark, spec: str) -> dict[str, str]:
    """The metrics this benchmark cannot give, with why: FID needs real images and two samples at least.

    Raises:
        BadInputError: FID named in ``--metrics`` where it cannot be computed.
    """
    unusable = {}
    if "fid" in names and not benchmark.has_real:
        unusable["fid"] = f"{spec} has no real images"
    elif "fid" in names and len(benchmark.prompts) < 2:
        unusable["fid"] = "it compares two distributions and needs at least 2 samples (the paper uses 5000)"
    if explicit and unusable:
        raise BadInputError(f"fid: {unusable['fid']}; use --benchmark mjhq or dci with more --num-samples, or "
                            "leave fid out of --metrics")
    return unusable


def _load_metrics(names: list[str], explicit: bool, device: str, clip_model: str, world: World) -> metrics.Suite:
    """Rank 0 loads the networks (it alone scores); a failure there stops every rank before generation.

    Raises:
        MetricUnavailable: on every rank, when rank 0 cannot load an explicitly named metric.
    """
    if world.size == 1:
        return metrics.load(names, explicit, device, clip_model, say)
    suite, error = None, None
    if world.leader:
        try:
            suite = metrics.load(names, explicit, device, clip_model, say)
        except metrics.MetricUnavailable as missing:
            error = str(missing)
    reason = world.exchange(error, "loading the metrics")[0]
    if reason:
        raise metrics.MetricUnavailable(reason if world.leader else f"rank 0: {reason}")
    return suite


def _fingerprints(run: Run, config: RunConfig, methods: list[str]) -> dict[str, dict]:
    """What determines each method's images besides the sample: the model; the quantize stage's config hash
    for the run's own method; a baseline's config and the calibration it is quantized from."""
    model = {"model": config.model, "family": config.family, "dtype": config.dtype,
             "pipeline_args": config.pipeline_args, "versions": {**library_versions(), "svdq": __version__}}
    prints = {REFERENCE: model, config.quant.method: {**model, "quantize": run.stage("quantize").get("hash")}}
    for name in methods[2:]:
        prints[name] = {**model, "baseline": name, "collect": run.stage("collect").get("hash"),
                        "config": baseline_fields(config.quant, name)}
    return prints


def _generate(workspace: Workspace, run: Run, config: RunConfig, store: ImageStore, method: str, keys: list[str],
              prompts: list[str], seeds: list[int], world: World) -> None:
    """This rank's missing images of ``method``, a chunk of prompts at a time."""
    missing = [i for i in range(len(prompts)) if world.owns(i) and not store.has(method, keys[i])]
    if not missing:
        return
    say(f"eval: {method}: generating {len(missing)} image(s)")
    with _layers(workspace, run, config, method), task(f"eval {method}", len(missing)) as advance:
        for start in range(0, len(missing), CHUNK):
            chunk = missing[start : start + CHUNK]
            encodings = workspace.encodings([prompts[i] for i in chunk], config.validation)
            for index, encoding in zip(chunk, encodings, strict=True):
                image = workspace.generate_one(prompts[index], seeds[index], encoding, config.validation)
                store.put(method, keys[index], image[0])
                advance(prompts[index][:40])


def _layers(workspace: Workspace, run: Run, config: RunConfig, method: str):
    if method == REFERENCE:
        return workspace.with_layers(lambda index: {})
    if method == config.quant.method:
        return workspace.with_layers(lambda index: quantized_block(run, index))
    return workspace.with_layers(baseline_layers(run, workspace, config.quant, method, keep=True))


def _batches(store: ImageStore, keys: dict[str, list[str]], methods: list[str], prompts: list[str]):
    """Batches of every method's images with the 16-bit ones they are compared with, each PNG read once."""
    def read(method: str, part: range) -> torch.Tensor:
        return torch.stack([store.read(method, keys[method][i]) for i in part])

    for start in range(0, len(prompts), metrics.BATCH):
        part = range(start, min(start + metrics.BATCH, len(prompts)))
        reference = read(REFERENCE, part)
        pairs = {method: (reference, None) if method == REFERENCE else (read(method, part), reference)
                 for method in methods}
        yield [prompts[i] for i in part], pairs


def _score(suite: metrics.Suite, benchmark: benchmarks.Benchmark, store: ImageStore, keys: dict[str, list[str]],
           methods: list[str], resolution: Resolution) -> dict:
    indices = list(range(len(benchmark.prompts)))
    if benchmark.has_real and "fid" in suite.names:
        real = benchmark.real(indices, resolution)
        suite.set_real(torch.stack(part) for part in _chunks(real, metrics.BATCH))
    batches = -(-len(indices) // metrics.BATCH)
    with task("eval scoring", batches) as advance:
        def counted(stream):
            for batch in stream:
                yield batch
                advance(f"{len(batch[0])} images × {len(methods)} methods")

        values = suite.scores_by_method(counted(_batches(store, keys, methods, benchmark.prompts)))
    scored = {method: {name: metrics.json_value(value) for name, value in values[method].items()}
              for method in methods}
    return {"metrics": suite.names, "methods": scored}


def _chunks(iterator, size: int):
    part = []
    for item in iterator:
        part.append(item)
        if len(part) == size:
            yield part
            part = []
    if part:
        yield part


def _write_report(run: Run, config: RunConfig, entry: dict, benchmark: benchmarks.Benchmark, store: ImageStore,
                  keys: dict[str, list[str]], methods: list[str], resolution: Resolution) -> None:
    """report.json (every evaluation of the run, this one's entry replaced), report.md and grid.png."""
    path = run.path / "eval" / "report.json"
    evaluations = {}
    if run.artifact_ok(STAGE, "eval/report.json"):
        evaluations = json.loads(path.read_text()).get("evaluations", {})
    key = report.entry_key(entry)
    evaluations.pop(key, None)
    evaluations = {key: entry, **evaluations}  # newest first
    document = {"model": config.model, "method": config.quant.method, "evaluations": evaluations}
    run.write_file(STAGE, "eval/report.json", (json.dumps(document, indent=2) + "\n").encode())
    run.write_file(STAGE, "eval/report.md", report.markdown(config.model, list(evaluations.values())).encode())
    rows = list(range(min(report.GRID_ROWS, len(benchmark.prompts))))
    columns = {}
    if benchmark.has_real:
        columns["real"] = list(benchmark.real(rows, resolution))
    for method in methods:
        columns[method] = [store.read(method, keys[method][i]) for i in rows]
    run.write_file(STAGE, "eval/grid.png", png_bytes(sheet([benchmark.prompts[i] for i in rows], columns)))
    run.stage(STAGE).update(status="done", finished=time.time(), seconds=sum(entry["seconds"].values()))
    run.save()
