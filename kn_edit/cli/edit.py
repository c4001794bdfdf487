"""`kn-edit update-fact`, `kn-edit erase-fact`, `kn-edit apply-patch` and `kn-edit revert-patch`.

Edits happen in memory; nothing is written unless --save DIR (the whole edited model) or --save-patch FILE
(the edit alone) is given. The method is chosen by name (--method; kn_edit.editing.registry); its settings
come from its defaults (configs/methods/NAME.yaml states them), --config FILE and key=value overrides such as
margin=2 (kn) or layer=6 (rome). Every table is read from the edit's report, the same for every method.
"""

from __future__ import annotations

import argparse
import inspect
from typing import TYPE_CHECKING

from .ui import add_model_argument, add_prompts_argument, add_settings_arguments, console, report_tables, table

if TYPE_CHECKING:
    from ..models.model import KnModel

# Facts unrelated to most edits: their top prediction should survive an edit.
DEFAULT_CONTROLS = [
    "The capital of Japan is",
    "The Eiffel Tower is located in the city of",
    "The chemical symbol for gold is",
    "The official language of Germany is",
    "Albert Einstein was born in",
]


def _add_settings(parser: argparse.ArgumentParser, example: str) -> None:
    add_settings_arguments(parser, "configs/methods/NAME.yaml", example)


def _add_fact(parser: argparse.ArgumentParser, default_method: str) -> None:
    from ..editing.registry import METHODS

    add_prompts_argument(parser, required=False)
    parser.add_argument("--facts", metavar="FILE.jsonl", help="edit every fact of this file in one batch (the user "
                        "fact-file format of kn_edit/data/jsonl.py, plus \"new\" per line for update-fact); one patch")
    parser.add_argument("--method", default=default_method, metavar="NAME",
                        help=f"editing method: {', '.join(METHODS)}, or module:Class (default: {default_method})")
    parser.add_argument("--subject", "-s", help="the fact's subject as it appears in the prompts (needed by rome)")
    parser.add_argument("--neurons", metavar="L:I,L:I", help="knowledge-neuron methods: edit these neurons instead of "
                                                             "locating them")
    parser.add_argument("--force", action="store_true", help="edit even where the model does not predict the fact")
    parser.add_argument("--control", action="append", dest="controls", metavar="PROMPT",
                        help="an unrelated prompt whose top prediction should survive (repeat; default: five built in)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_save(parser: argparse.ArgumentParser, patch: bool = True) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--save", metavar="DIR", help="write the edited model to this new folder")
    if patch:
        group.add_argument("--save-patch", metavar="FILE", help="write the edit as a patch file (safetensors)")


def register(sub: argparse._SubParsersAction) -> None:
    update = sub.add_parser("update-fact", help="change a fact the model knows (old → new), by default by editing "
                                                "its knowledge neurons; shows predictions before and after")
    add_model_argument(update)
    _add_fact(update, "kn")
    update.add_argument("--old", help="the object the model predicts now, e.g. Paris")
    update.add_argument("--new", help="the object it should predict, e.g. Rome")
    _add_save(update)
    _add_settings(update, "margin=2 generic_filter=false (kn), layer=6 (rome)")
    update.set_defaults(func=run_update)

    erase = sub.add_parser("erase-fact", help="erase a fact: by default its knowledge neurons' value vectors set to 0 "
                                              "(or E(unk))")
    add_model_argument(erase)
    _add_fact(erase, "kn-erase")
    erase.add_argument("--target", "-t", help="the object to erase, e.g. Paris")
    _add_save(erase)
    _add_settings(erase, "mode=unk")
    erase.set_defaults(func=run_erase)

    apply = sub.add_parser("apply-patch", help="apply a patch file to a model (and --save the patched model)")
    add_model_argument(apply)
    apply.add_argument("--patch", required=True, help="patch file written by update-fact/erase-fact --save-patch")
    _add_save(apply, patch=False)
    apply.set_defaults(func=run_apply_patch)

    revert = sub.add_parser("revert-patch", help="take a patch off a model that carries it, e.g. a saved patched "
                                                 "model (and --save the result)")
    add_model_argument(revert)
    revert.add_argument("--patch", required=True, help="the patch file the model was patched with")
    _add_save(revert, patch=False)
    revert.set_defaults(func=run_revert_patch)


# ----- helpers -----------------------------------------------------------------------------------------------
def _editor(args: argparse.Namespace):
    """The --method editor with its settings (--config files, key=value overrides, --force, --neurons)."""
    from dataclasses import fields

    from ..editing.registry import make_editor, method_config, resolve
    from ..errors import ConfigError
    from ..progress import default_reporter

    cls, _, name = resolve(args.method)
    overrides = list(args.overrides)
    extras = {"reporter": default_reporter(args.quiet)}
    if args.force:
        if "force" not in {f.name for f in fields(method_config(args.method))}:
            raise ConfigError(f"--force does not apply to {name}: it does not check that the model knows the fact")
        overrides.append("force=true")
    if args.neurons:
        if "neurons" not in inspect.signature(cls.__init__).parameters:
            raise ConfigError(f"--neurons applies to the knowledge-neuron methods, not to {name}")
        extras["neurons"] = _neurons(args)
    return make_editor(args.method, args.config, overrides, **extras)


def _load(args: argparse.Namespace, quiet: bool = False) -> KnModel:
    from .. import load
    from ..progress import default_reporter

    return load(args.model, device=args.device, reporter=default_reporter(quiet))


def _control_prompt(km: KnModel, text: str) -> str:
    if km.is_masked_lm and not any(m in text for m in ("[MASK]", "[Y]", km.tokenizer.mask_token or "[MASK]")):
        return text + " [MASK]."
    return text


def _snapshot(km: KnModel, prompts: list[str], objects: list[str]) -> list[dict]:
    """Per prompt: top prediction and P(object) for each object."""
    rows = []
    for prompt in prompts:
        top = km.predict(prompt, top_k=1)[0]
        rows.append({"top": top.token, "top_p": top.prob, **{o: km.prob(prompt, o) for o in objects}})
    return rows


def _before_after_table(title: str, prompts: list[str], kinds: list[str], objects: list[str], before, after):
    rows = []
    for prompt, kind, b, a in zip(prompts, kinds, before, after):
        row = [kind, prompt, f"{b['top']!r} {b['top_p']:.3f}", f"{a['top']!r} {a['top_p']:.3f}"]
        row += [f"{b[o]:.4f} → {a[o]:.4f}" for o in objects]
        rows.append(row)
    return table(title, ["", "prompt", "top before", "top after"] + [f"P({o})" for o in objects], rows)


def _check_save(km: KnModel, args: argparse.Namespace) -> None:
    """Refuse a bad --save/--save-patch path before the (slow) edit, not after it."""
    from ..models.saving import check_model_path
    from ..storage.atomic import check_new_file

    if getattr(args, "save", None):
        check_model_path(km, args.save)
    if getattr(args, "save_patch", None):
        check_new_file(args.save_patch)


def _save(km: KnModel, edit, args: argparse.Namespace) -> str | None:
    if getattr(args, "save", None):
        path = km.save(args.save)
        return f"edited model written to {path}"
    if getattr(args, "save_patch", None):
        edit.save(args.save_patch)
        return f"patch written to {args.save_patch}"
    return None


def _neurons(args: argparse.Namespace):
    from ..models.neurons import parse_neurons

    return parse_neurons(args.neurons) if args.neurons else None


# ----- commands ---------------------------------------------------------------------------------------------
def _run_with_controls(args: argparse.Namespace, editor, request, objects: list[str]):
    """What update-fact and erase-fact share: load, refuse a bad save path, snapshot the edit and control prompts,
    apply, snapshot again. Returns (km, edit, prompts, kinds, before, after)."""
    km = _load(args, args.quiet)
    _check_save(km, args)
    controls = [_control_prompt(km, c) for c in (args.controls or DEFAULT_CONTROLS)]
    prompts = list(request.prompts) + controls
    kinds = ["edit"] * len(request.prompts) + ["control"] * len(controls)
    before = _snapshot(km, prompts, objects)
    edit = editor.apply(km, [request])
    after = _snapshot(km, prompts, objects)
    return km, edit, prompts, kinds, before, after


def _controls_kept(before: list[dict], after: list[dict], kinds: list[str]) -> int:
    return sum(b["top"] == a["top"] for b, a, k in zip(before, after, kinds) if k == "control")


def _one_fact_or_file(args: argparse.Namespace, needed: tuple[str, ...]) -> None:
    """Either --facts FILE or the single fact's arguments (--prompt and ``needed``), not both."""
    from ..errors import ConfigError

    flags = {"prompts": "--prompt", "old": "--old", "new": "--new", "target": "--target"}
    given = [flags[n] for n in ("prompts", *needed) if getattr(args, n, None)]
    if args.facts and given:
        raise ConfigError(f"give either --facts FILE or the fact itself ({', '.join(given)}), not both")
    if args.facts and args.subject:
        raise ConfigError("--subject does not go with --facts: each line of the fact file carries its own subject")
    missing = [flags[n] for n in ("prompts", *needed) if not getattr(args, n, None)]
    if not args.facts and missing:
        raise ConfigError(f"missing {', '.join(missing)} (or give --facts FILE.jsonl to edit a list of facts)")


def run_batch(args: argparse.Namespace, erase: bool) -> int:
    """--facts FILE: every fact of the file in one edit (one patch), judged by the edit's report."""
    from ..data.jsonl import load_edit_requests, read_jsonl

    editor = _editor(args)
    for _ in read_jsonl(args.facts):  # a missing, folder or malformed file fails before the model loads
        pass
    km = _load(args, args.quiet)
    _check_save(km, args)
    requests = load_edit_requests(args.facts, km.is_masked_lm, erase=erase)  # a malformed line: nothing applied
    controls = [_control_prompt(km, c) for c in (args.controls or DEFAULT_CONTROLS)]
    before = _snapshot(km, controls, [])
    edit = editor.apply(km, requests)
    after = _snapshot(km, controls, [])
    report = edit.report
    con = console()
    for part in report_tables(report):
        con.print(part)
    kept = _controls_kept(before, after, ["control"] * len(controls))
    from ..editing.report import request_successes

    by_request = request_successes(requests, report.prompts)
    verdict = "[bold green]success[/]" if report.success else "[bold red]failed[/]"
    con.print(f"{verdict}: {sum(by_request)}/{len(requests)} facts hold on every prompt "
              f"({sum(p.success for p in report.prompts)}/{len(report.prompts)} prompts); controls keeping their top "
              f"prediction: {kept}/{len(controls)}")
    written = _save(km, edit, args)
    con.print(written or "nothing written (use --save DIR or --save-patch FILE to keep the edit)")
    return 0


def run_update(args: argparse.Namespace) -> int:
    from ..data.records import EditRequest

    _one_fact_or_file(args, ("old", "new"))
    if args.facts:
        return run_batch(args, erase=False)
    # checks old != new before the model loads
    request = EditRequest(args.prompts, args.old, args.new, subject=args.subject)
    editor = _editor(args)
    objects = [args.old, args.new]
    km, edit, prompts, kinds, before, after = _run_with_controls(args, editor, request, objects)
    report = edit.report
    con = console()
    con.print(_before_after_table(f"{km.name}: {args.old!r} → {args.new!r} ({report.method})", prompts, kinds,
                                  objects, before, after))
    for part in report_tables(report):
        con.print(part)
    kept = _controls_kept(before, after, kinds)
    verdict = "[bold green]success[/]" if report.success else "[bold red]failed[/]"
    held = sum(p.success for p in report.prompts)
    con.print(f"{verdict}: {args.new!r} is the greedy answer on {held}/{len(report.prompts)} edit prompts; controls "
              f"keeping their top prediction: {kept}/{kinds.count('control')}")
    written = _save(km, edit, args)
    con.print(written or "nothing written (use --save DIR or --save-patch FILE to keep the edit)")
    return 0


def run_erase(args: argparse.Namespace) -> int:
    from ..data.records import EditRequest

    _one_fact_or_file(args, ("target",))
    if args.facts:
        return run_batch(args, erase=True)
    request = EditRequest(args.prompts, args.target, subject=args.subject)
    editor = _editor(args)
    if not editor.can_erase:
        from ..errors import ConfigError

        raise ConfigError(f"{editor.name} cannot erase facts; use an erasing method (kn-erase)")
    km, edit, prompts, kinds, before, after = _run_with_controls(args, editor, request, [args.target])
    report = edit.report
    con = console()
    con.print(_before_after_table(f"{km.name}: erasing {args.target!r} ({report.method})", prompts, kinds,
                                  [args.target], before, after))
    for part in report_tables(report):
        con.print(part)
    n = len(request.prompts)
    lowered = sum(a[args.target] < b[args.target] for b, a in zip(before[:n], after[:n]))
    mean_b = sum(b[args.target] for b in before[:n]) / n
    mean_a = sum(a[args.target] for a in after[:n]) / n
    kept = _controls_kept(before, after, kinds)
    con.print(f"P({args.target!r}) lowered on {lowered}/{n} prompts (mean {mean_b:.4f} → {mean_a:.4f}); no longer top-1 on "
              f"{sum(p.success for p in report.prompts)}/{n}; controls keeping their top prediction: "
              f"{kept}/{kinds.count('control')}")
    written = _save(km, edit, args)
    con.print(written or "nothing written (use --save DIR or --save-patch FILE to keep the edit)")
    return 0


def _patch_command(args: argparse.Namespace, reverse: bool) -> int:
    from ..editing import apply_patch, read_patch

    meta, _ = read_patch(args.patch)
    km = _load(args)
    _check_save(km, args)
    prompts = [p for r in meta.get("requests", []) for p in r.get("prompts", [])]
    objects = list(dict.fromkeys(o for r in meta.get("requests", []) for o in (r.get("old"), r.get("new")) if o))
    before = _snapshot(km, prompts, objects) if prompts else []
    edit = apply_patch(km, args.patch, reverse=reverse)
    con = console()
    verb = "removed" if reverse else "applied"
    if prompts:
        after = _snapshot(km, prompts, objects)
        con.print(_before_after_table(f"{km.name}: patch {verb} ({meta.get('editor')})", prompts, ["edit"] * len(prompts),
                                      objects, before, after))
    rows = [[p.name, p.index.numel()] for p in edit.patches]
    con.print(table(f"patch {verb}: {args.patch} (made on {meta.get('model')!r})", ["parameter", "rows"], rows))
    written = _save(km, edit, args)
    con.print(written or "nothing written (use --save DIR to write the resulting model)")
    return 0


def run_apply_patch(args: argparse.Namespace) -> int:
    return _patch_command(args, reverse=False)


def run_revert_patch(args: argparse.Namespace) -> int:
    return _patch_command(args, reverse=True)
