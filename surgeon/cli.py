"""The `surgeon` command line: check, apply, revert, merge, inspect."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree
from torch import nn

from surgeon import progress
from surgeon.quant.bnb import check_bnb_4bit, save_bnb_4bit
from surgeon.errors import SurgeonError, did_you_mean
from surgeon.files import same_or_nested, write_dir
from surgeon.graph import ModuleGraph, build_module_graph
from surgeon.job import apply_checkpoint
from surgeon.adapterhub_format import describe as describe_adapterhub
from surgeon.adapterhub_format import fusion_folder, is_adapterhub_dir
from surgeon.job import Job, import_adapterhub, import_adapterhub_fusion, import_peft, load
from surgeon.language import parse_spec, read_spec_text
from surgeon.loads import expand_loads
from surgeon.manifest import Manifest, read_manifest
from surgeon.methods.base import registry
from surgeon.models import load_model, reload_source, sample_output, save_base_model
from surgeon.patterns import PatternError, compile_pattern
from surgeon.planner import Plan, plan
from surgeon.report import plan_summary, print_plan

app = typer.Typer(
    help="Declarative model surgery for parameter-efficient fine-tuning.\n\n"
    "A .peft spec says what to change (e.g. 'inject lora r=8 into *.attn.<q,v>'); surgeon checks it "
    "against the model before any tensor changes, patches the model, and writes a manifest from "
    "which the original comes back bit for bit.\n\n"
    "MODEL is a Hugging Face directory (config.json + safetensors) or package.module:factory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (scripts, CI logs) gets wide lines instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of tables")]
CheckpointOpt = Annotated[
    str | None, typer.Option("--checkpoint", help="safetensors weights for a package.module:factory MODEL")
]


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def user_errors(command: F) -> F:
    """A user's mistake prints one clear message and exits 2; never a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        as_json = kwargs.get("as_json", False)
        try:
            _quiet_libraries()
            with progress.settings(enabled=not as_json, console=err):  # --json: no bars on stderr
                return command(*args, **kwargs)
        except SurgeonError as problem:
            if as_json:
                print(json.dumps({"ok": False, "error": str(problem)}))
            else:
                err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None

    return run  # type: ignore[return-value]


@contextmanager
def _status(message: str, as_json: bool) -> Iterator[None]:
    if as_json or not err.is_terminal:
        yield
        return
    with err.status(message):
        yield


def _plan_for(spec: str, model_ref: str, checkpoint: str | None) -> tuple[Plan, ModuleGraph]:
    text, source = read_spec_text(spec)
    parsed = parse_spec(text, source)
    model, _ = load_model(model_ref, checkpoint=checkpoint, meta=True)
    graph = build_module_graph(model)
    return plan(expand_loads(parsed, model)[0], graph), graph


def _plan_json(the_plan: Plan) -> dict[str, Any]:
    return plan_summary(the_plan)


def _print_plan(summary: dict[str, Any]) -> None:
    print_plan(summary, out)


@app.command()
@user_errors
def check(
    spec: Annotated[str, typer.Argument(help="a .peft file")],
    model: Annotated[str, typer.Argument(help="HF model directory or package.module:factory")],
    checkpoint: CheckpointOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Parse, plan and run every check; print the plan. Changes nothing; exit 0 when it would apply."""
    with _status("planning", as_json):
        the_plan, _ = _plan_for(spec, model, checkpoint)
    summary = _plan_json(the_plan)
    if as_json:
        print(json.dumps(summary))
    else:
        _print_plan(summary)


def _fresh_out(path: Path, force: bool, *inputs: Path | str | None) -> None:
    """--out must be new or empty (or --force), and must not be, hold or lie inside what is read."""
    for given in inputs:
        if given is not None and not _is_factory_ref(str(given)) and same_or_nested(path, Path(given)):
            raise SurgeonError(f"--out {path} is, holds or lies inside {given}, which this command reads; "
                               "choose an --out elsewhere")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not force:
            raise SurgeonError(f"{path} already exists and is not empty; choose another --out or pass --force")


def _is_factory_ref(ref: str) -> bool:
    return ":" in ref and not os.path.exists(ref)


@app.command("apply")
@user_errors
def apply_command(
    spec: Annotated[str, typer.Argument(help="a .peft file")],
    model: Annotated[str, typer.Argument(help="HF model directory or package.module:factory")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write (manifest.json + adapters)")],
    checkpoint: CheckpointOpt = None,
    seed: Annotated[int | None, typer.Option(help="random seed for the added weights")] = None,
    full_fingerprint: Annotated[bool, typer.Option(help="hash every tensor, not only the touched ones")] = False,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    device: Annotated[str | None, typer.Option(help="do the work on this device (cuda: quantize there)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Patch MODEL as SPEC says and write the run: manifest.json + adapters.safetensors."""
    text, source = read_spec_text(spec)
    parsed = parse_spec(text, source)
    _fresh_out(out_dir, force, model, checkpoint)
    with _status("loading and patching the model", as_json):
        job = apply_checkpoint(parsed, model, seed=seed, checkpoint=checkpoint, full_fingerprint=full_fingerprint,
                               device=device)
    write_dir(out_dir, job.save)
    summary = _plan_json(job.plan) | {"run": str(out_dir)}
    if as_json:
        print(json.dumps(summary))
        return
    _print_plan(summary)
    out.print(f"wrote {out_dir}/manifest.json and {out_dir}/adapters.safetensors")


ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="the base model (HF directory or package.module:factory); default: the HF directory the "
                    "run records. A factory is run only when named here")]


@app.command()
@user_errors
def revert(
    run: Annotated[Path, typer.Argument(help="a run directory written by 'surgeon apply' or job.save()")],
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the original model")],
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    verify_all: Annotated[bool, typer.Option("--verify-all", help="refuse unless every tensor is checked by "
                                                                  "sha256 (needs a run made with --full-fingerprint)")] = False,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the original model back, bit-identical to the source, verified by the manifest's hashes."""
    if verify_all and not read_manifest(run).fingerprint_full:
        raise SurgeonError(f"{run} hashed only the tensors it changed at apply, so --verify-all cannot check "
                           "the others; re-create the run with --full-fingerprint")
    manifest = _rerun_and_write(run, out_dir, force, as_json, "re-applying and reverting", Job.revert, model=model,
                                checkpoint=checkpoint)
    hashed = sum(1 for r in manifest.fingerprint.values() if r.sha256)
    rest = len(manifest.fingerprint) - hashed
    if as_json:
        print(json.dumps({"ok": True, "out": str(out_dir), "tensors": len(manifest.fingerprint), "hashed": hashed,
                          "checked_by_shape": rest}))
        return
    unhashed = (f"; the other {rest} were not changed by the run and are checked by name, dtype and shape, "
                "read from source files unchanged since apply" if rest else "")
    out.print(f"reverted {len(manifest.patches)} patches; {hashed} tensors verified by sha256{unhashed}; "
              f"wrote {out_dir}")


def _rerun_and_write(run: Path, out_dir: Path, force: bool, as_json: bool, doing: str,
                     finish: Callable[[Job], Any],
                     write: Callable[[Any, Path], None] = save_base_model, *, model: str | None = None,
                     checkpoint: str | None = None) -> Manifest:
    """Read the run's source model again (or the one the user names), re-apply the run, `finish`
    it, `write` the result to out_dir (staged: out_dir appears only when all went well)."""
    manifest = read_manifest(run)
    source = manifest.source.location if manifest.source.kind == "hf" else None
    _fresh_out(out_dir, force, run, model or source, checkpoint)
    with _status("reading the source model", as_json):
        base, directory = reload_source(manifest.source, model, checkpoint, full_fingerprint=manifest.fingerprint_full)
    with _status(doing, as_json):
        result = finish(load(run, base, originals_from=directory))
    write_dir(out_dir, lambda staging: write(result, staging))
    return manifest


def _adapter_weights(given: list[str]) -> dict[str, float]:
    """--adapter NAME / NAME=WEIGHT, as {name: weight}."""
    weights: dict[str, float] = {}
    for item in given:
        name, _, weight = item.partition("=")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise SurgeonError(f"--adapter {item!r}: the weight after '=' is a number (NAME=0.5)") from None
    return weights


@app.command()
@user_errors
def merge(
    run: Annotated[Path, typer.Argument(help="a run directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the merged checkpoint")],
    requantize: Annotated[bool, typer.Option(help="quantize the merged layers again and write bitsandbytes' "
                                                  "4-bit format (transformers loads it with bitsandbytes)")] = False,
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", help="merge only this named adapter (repeat for several, stacked; NAME=WEIGHT for a weighted "
                          "combination); the run's other named adapters are left out")] = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a plain checkpoint with the deltas folded in, loadable by stock transformers.

    Quantized layers are written dequantized, in the original weights' dtype, unless --requantize
    quantizes them again (same type, block size, double quantization). The max abs difference
    between the merged and the unmerged forward on a sample input is reported. With --adapter,
    only the named adapters given (and the run's unnamed statements) are folded in."""
    report: dict[str, float | None] = {"max_abs_diff": None}
    chosen = _adapter_weights(adapter) if adapter else None
    kept_open = ExitStack()  # a partial merge lives inside job.merged(...): open until written

    def merge_and_compare(job: Job) -> nn.Module:
        if requantize:
            check_bnb_4bit(job.model)  # before any work: int8, mixed types, nothing quantized
        if chosen is not None:
            job.activate(chosen)
        before = sample_output(job.model)
        if chosen is None:
            merged = job.merge(requantize=requantize)
        else:
            merged = kept_open.enter_context(job.merged(chosen, requantize=requantize))
        after = sample_output(merged)
        if before is not None and after is not None:
            report["max_abs_diff"] = (after - before).abs().max().item()
        return merged

    write = save_bnb_4bit if requantize else save_base_model
    with kept_open:
        manifest = _rerun_and_write(run, out_dir, force, as_json, "merging", merge_and_compare, write, model=model,
                                    checkpoint=checkpoint)
    merged_count = sum(1 for record in manifest.patches if chosen is None or record.name in (None, *chosen))
    if as_json:
        print(json.dumps({"ok": True, "out": str(out_dir), "merged": merged_count,
                          "requantized": requantize} | report))
        return
    diff = report["max_abs_diff"]
    compared = f"; merged vs unmerged forward on a sample input: max abs diff {diff:.3g}" if diff is not None else ""
    again = " (requantized, bitsandbytes 4-bit format)" if requantize else ""
    out.print(f"merged {merged_count} patches{again}{compared}; wrote {out_dir}")


@app.command()
@user_errors
def fold(
    run: Annotated[Path, typer.Argument(help="a run directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write, with the folded tensors")],
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Replace training-time reparameterisations (prefix tuning's MLP) by the plain tensors they
    produce and write the run again: smaller, the same outputs."""
    def fold_job(job: Job) -> Job:
        job.fold()
        return job

    _rerun_and_write(run, out_dir, force, as_json, "folding", fold_job, lambda job, path: job.save(path),
                     model=model, checkpoint=checkpoint)
    folded = sum(r.folded for r in read_manifest(out_dir).patches)
    if as_json:
        print(json.dumps({"ok": True, "run": str(out_dir), "folded": folded}))
        return
    out.print(f"folded {folded} patches; wrote {out_dir}")


@app.command()
@user_errors
def export(
    run: Annotated[Path, typer.Argument(help="a run directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the exported adapter")],
    format: Annotated[str, typer.Option("--format", help="the target format: peft, or adapterhub (bottleneck "
                                                        "adapters, for AdapterHub's adapters 1.3)")] = "peft",
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the run as a Hugging Face PEFT adapter (adapter_config.json + adapter_model.safetensors)
    that peft.PeftModel.from_pretrained(base_model, OUT) loads, with the same outputs.

    Quantize statements are left out (load the base quantized with bitsandbytes to match); a
    feature PEFT cannot hold (LoRA on only the q and v slices of GPT-2's fused c_attn) is refused
    with the reason.

    --format adapterhub writes AdapterHub's saved adapter (adapter_config.json + adapter.safetensors,
    adapters 1.3.0's layout) of a run of `inject adapter` statements, which
    model.load_adapter(OUT, use_safetensors=True) loads after adapters.init(model); layers the run
    leaves without adapters become leave_out, and anything else (other methods, a Qwen2 model) is
    refused with the reason."""
    if format not in ("peft", "adapterhub"):
        raise SurgeonError(f"unknown format '{format}': the export formats are 'peft' and 'adapterhub'")
    _rerun_and_write(run, out_dir, force, as_json, "exporting", lambda job: job,
                     lambda job, path: job.save(path, format=format), model=model, checkpoint=checkpoint)
    if format == "adapterhub":
        _say_adapterhub_export(json.loads((out_dir / "adapter_config.json").read_text()), out_dir, as_json)
        return
    written = {path.parent: json.loads(path.read_text()) for path in sorted(out_dir.glob("**/adapter_config.json"))}
    if as_json:
        adapters = {str(folder.relative_to(out_dir)) if folder != out_dir else "default":
                    {"peft_type": config["peft_type"], "target_modules": config.get("target_modules")}
                    for folder, config in written.items()}
        print(json.dumps({"ok": True, "out": str(out_dir), **adapters.get("default", {}), "adapters": adapters}))
        return
    for folder, config in written.items():
        modules = config.get("target_modules")  # none for prompt learning: one top-level prompt
        where = f" for {len(modules)} module names" if modules else ""
        named = f" '{folder.name}'" if folder != out_dir else ""
        out.print(f"wrote a PEFT {config['peft_type']} adapter{named}{where} to {folder}")
    if len(written) > 1:
        out.print(f"load them with PeftModel.from_pretrained(base, '{out_dir}/NAME', adapter_name='NAME') and "
                  "model.load_adapter(...) for the others")


def _say_adapterhub_export(saved: dict[str, Any], out_dir: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": True, "out": str(out_dir), "format": "adapterhub", "name": saved["name"],
                          "config": saved["config"]}))
        return
    out.print(f"wrote the AdapterHub adapter '{saved['name']}', {escape(describe_adapterhub(saved))}, to {out_dir}; "
              f"load it with model.load_adapter('{out_dir}', use_safetensors=True)", highlight=False)


@app.command("import")
@user_errors
def import_command(
    peft_dir: Annotated[Path, typer.Argument(help="a PEFT adapter directory (adapter_config.json + "
                                             "adapter_model.safetensors) or an AdapterHub one (+ adapter.safetensors)")],
    model: Annotated[str, typer.Option("--model", help="the base model: HF directory or package.module:factory")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write")],
    checkpoint: CheckpointOpt = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn a PEFT or AdapterHub adapter (told apart by its config) into a surgeon run: a .peft
    spec that says the same thing, the weights and a manifest, which `surgeon.load(RUN, model)` applies.

    An AdapterHub fusion (a folder with adapter_fusion_config.json, or one holding such a folder
    beside its adapters' folders, as save_adapter_fusion and save_adapter write them) imports as
    named adapters and their `fuse adapters` statement."""
    _fresh_out(out_dir, force, peft_dir, model, checkpoint)
    with _status("importing", as_json):
        fusion = fusion_folder(peft_dir)
        if fusion is not None:
            job = import_adapterhub_fusion(fusion, model, checkpoint=checkpoint)
        elif is_adapterhub_dir(peft_dir):
            job = import_adapterhub(peft_dir, model, checkpoint=checkpoint)
        else:
            job = import_peft(peft_dir, model, checkpoint=checkpoint)
        write_dir(out_dir, job.save)
    if as_json:
        print(json.dumps({"ok": True, "run": str(out_dir), "spec": job.manifest.spec_text}))
        return
    out.print(escape(job.manifest.spec_text.strip()), highlight=False)
    out.print(f"wrote {out_dir}/manifest.json, {out_dir}/adapters.safetensors and {out_dir}/spec.peft")


@app.command()
@user_errors
def methods(
    name: Annotated[str | None, typer.Argument(help="one method's parameters, e.g. 'lora'")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the methods a spec can name, or one method's parameters with their defaults."""
    found = {f"{verb} {method_name}" if verb != method_name else verb: method
             for (verb, method_name), method in sorted(registry().items())}
    if name is not None:
        matches = {k: m for k, m in found.items() if name in (k, k.split()[-1])}
        if not matches:
            raise SurgeonError(f"unknown method '{name}'; {did_you_mean(name, [k.split()[-1] for k in found]) or ''}"
                               f" methods: {', '.join(k.split()[-1] for k in found)}")
        found = matches
    rows = [{"statement": statement, "summary": method.summary, "targets": sorted(method.kinds),
             "clauses": sorted(method.prepositions),
             "peft": method.peft_type, "mergeable": method.mergeable,
             "parameters": {key: {"default": None if field.is_required() else field.default,
                                  "required": field.is_required(), "description": field.description}
                            for key, field in method.Params.model_fields.items()}}
            for statement, method in found.items()]
    if as_json:
        print(json.dumps(rows, default=str))
        return
    if name is None:
        table = Table(title=f"{len(rows)} methods ('surgeon methods NAME' for the parameters)", title_justify="left")
        for column in ("statement", "what it does", "targets", "PEFT"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["statement"], escape(row["summary"]), ", ".join(row["targets"]), row["peft"] or "-")
        out.print(table)
        return
    for row in rows:
        clauses = " | ".join(f"{p} PATTERN" for p in row["clauses"])
        form = f"{row['statement']} [{clauses}]" if clauses else row["statement"]  # fuse, gate: over named adapters
        table = Table(title=escape(f"{form}: {row['summary']}"), title_justify="left")
        for column in ("parameter", "default", "meaning"):
            table.add_column(column)
        for key, field in row["parameters"].items():
            default = "required" if field["required"] else repr(field["default"])
            table.add_row(key, escape(default), escape(field["description"] or ""))
        out.print(table)


@app.command()
@user_errors
def inspect(
    model: Annotated[str, typer.Argument(help="HF model directory or package.module:factory")],
    pattern: Annotated[str | None, typer.Argument(help="show what this pattern matches")] = None,
    checkpoint: CheckpointOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the module tree with roles, or what PATTERN matches."""
    base, _ = load_model(model, checkpoint=checkpoint, meta=True)
    graph = build_module_graph(base)
    if pattern is not None:
        _print_matches(graph, pattern, as_json)
        return
    if as_json:
        print(json.dumps([{"path": i.path, "type": i.type_name, "kind": i.kind, "roles": list(i.role_paths),
                           "slices": list(i.slices)} for i in graph.modules.values()]))
        return
    out.print(_tree(graph))


def _print_matches(graph: ModuleGraph, pattern: str, as_json: bool) -> None:
    try:
        compiled = compile_pattern(pattern)
    except PatternError as problem:
        raise SurgeonError(f"bad pattern '{pattern}': {problem}") from None
    hits: dict[str, list[str]] = {}
    for name, path, slice_name in graph.candidates():
        if compiled.matches(name):
            hits.setdefault(path, []).append(slice_name or "")
    if as_json:
        print(json.dumps({"pattern": pattern, "matches": [{"path": p, "slices": sorted(s for s in v if s)}
                                                          for p, v in hits.items()]}))
        return
    if not hits:
        raise SurgeonError(f"pattern '{pattern}' matches no module")
    table = Table(title=f"{len(hits)} modules match {pattern}", title_justify="left")
    for column in ("path", "roles", "type", "slices"):
        table.add_column(column)
    for path, slices in hits.items():
        info = graph.modules[path]
        table.add_row(path, ", ".join(info.role_paths), info.type_name, ",".join(sorted(s for s in slices if s)))
    out.print(table)


def _tree(graph: ModuleGraph) -> Tree:
    root = Tree(f"[bold]{graph.modules[''].type_name}[/]")
    nodes = {"": root}
    for path, info in graph.modules.items():
        if not path:
            continue
        parent = nodes.get(path.rpartition(".")[0], root)
        roles = f" [cyan]{', '.join(info.role_paths)}[/]" if info.role_paths else ""
        slices = f" [magenta]slices {','.join(info.slices)}[/]" if info.slices else ""
        shape = info.params.get("weight")
        dims = f" {'x'.join(map(str, shape.shape))}" if shape else ""
        nodes[path] = parent.add(f"{path.rpartition('.')[2]} [dim]{info.type_name}{dims}[/]{roles}{slices}")
    return root


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        sys.exit(130)
