"""`kn-edit update-fact`, `kn-edit erase-fact`, `kn-edit apply-patch` and `kn-edit revert-patch`.

Edits happen in memory; nothing is written unless --save DIR (the whole edited model) or --save-patch FILE
(the edit alone) is given. Settings come from configs/edit.yaml (--config FILE) and key=value overrides
such as update.margin=2 or erase.mode=unk.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ..editing.settings import EraseSettings, UpdateSettings
from .ui import add_model_argument, add_prompts_argument, add_settings_arguments, console, table

# Facts unrelated to most edits: their top prediction should survive an edit.
DEFAULT_CONTROLS = [
    "The capital of Japan is",
    "The Eiffel Tower is located in the city of",
    "The chemical symbol for gold is",
    "The official language of Germany is",
    "Albert Einstein was born in",
]


@dataclass
class EditCommandConfig:
    """Schema of configs/edit.yaml."""

    update: UpdateSettings = field(default_factory=UpdateSettings)
    erase: EraseSettings = field(default_factory=EraseSettings)
    controls: list[str] = field(default_factory=lambda: list(DEFAULT_CONTROLS))


def _add_settings(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, "configs/edit.yaml", "update.margin=2 update.generic_filter=false erase.mode=unk")


def _add_fact(parser: argparse.ArgumentParser) -> None:
    add_prompts_argument(parser)
    parser.add_argument("--neurons", metavar="L:I,L:I", help="edit these neurons instead of locating them")
    parser.add_argument("--force", action="store_true", help="edit even where the model does not predict the fact")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_save(parser: argparse.ArgumentParser, patch: bool = True) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--save", metavar="DIR", help="write the edited model to this new folder")
    if patch:
        group.add_argument("--save-patch", metavar="FILE", help="write the edit as a patch file (safetensors)")


def register(sub: argparse._SubParsersAction) -> None:
    update = sub.add_parser("update-fact", help="change a fact the model knows (old → new) by editing its "
                                                "knowledge neurons; shows predictions before and after")
    add_model_argument(update)
    _add_fact(update)
    update.add_argument("--old", required=True, help="the object the model predicts now, e.g. Paris")
    update.add_argument("--new", required=True, help="the object it should predict, e.g. Rome")
    update.add_argument("--rule", choices=["signed", "paper", "unscaled"], help="update rule (default: signed)")
    _add_save(update)
    _add_settings(update)
    update.set_defaults(func=run_update)

    erase = sub.add_parser("erase-fact", help="erase a fact: its knowledge neurons' value vectors set to 0 (or E(unk))")
    add_model_argument(erase)
    _add_fact(erase)
    erase.add_argument("--target", "-t", required=True, help="the object to erase, e.g. Paris")
    erase.add_argument("--mode", choices=["zero", "unk"], help="zero (default) or unk")
    _add_save(erase)
    _add_settings(erase)
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
def _config(args: argparse.Namespace) -> EditCommandConfig:
    from ..configuration import load_config

    cfg = load_config(EditCommandConfig, args.config, args.overrides)
    cfg.update.check()
    cfg.erase.check()
    return cfg


def _load(args: argparse.Namespace, quiet: bool = False):
    from .. import load
    from ..progress import default_reporter

    return load(args.model, device=args.device, reporter=default_reporter(quiet))


def _control_prompt(km, text: str) -> str:
    if km.is_masked_lm and not any(m in text for m in ("[MASK]", "[Y]", km.tokenizer.mask_token or "[MASK]")):
        return text + " [MASK]."
    return text


def _snapshot(km, prompts: list[str], objects: list[str]) -> list[dict]:
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


def _neuron_table(title: str, neurons: list[dict]):
    rows = [[n["layer"], n["index"], n.get("score", float("nan")), n.get("activation", float("nan"))] for n in neurons]
    return table(title, ["layer", "index", "score", "activation"], rows)


def _check_save(km, args: argparse.Namespace) -> None:
    """Refuse a bad --save/--save-patch path before the (slow) edit, not after it."""
    from ..saving import check_model_path, check_new_file

    if getattr(args, "save", None):
        check_model_path(km, args.save)
    if getattr(args, "save_patch", None):
        check_new_file(args.save_patch)


def _save(km, edit, args: argparse.Namespace) -> str | None:
    if getattr(args, "save", None):
        path = km.save(args.save)
        return f"edited model written to {path}"
    if getattr(args, "save_patch", None):
        edit.save(args.save_patch)
        return f"patch written to {args.save_patch}"
    return None


def _neurons(args: argparse.Namespace):
    from ..neurons import parse_neurons

    return parse_neurons(args.neurons) if args.neurons else None


# ----- commands ---------------------------------------------------------------------------------------------
def _run_with_controls(args: argparse.Namespace, controls_text: list[str], editor, request, objects: list[str]):
    """What update-fact and erase-fact share: load, refuse a bad save path, snapshot the edit and control prompts,
    apply, snapshot again. Returns (km, edit, prompts, kinds, before, after)."""
    km = _load(args, args.quiet)
    _check_save(km, args)
    controls = [_control_prompt(km, c) for c in controls_text]
    prompts = list(request.prompts) + controls
    kinds = ["edit"] * len(request.prompts) + ["control"] * len(controls)
    before = _snapshot(km, prompts, objects)
    edit = editor.apply(km, [request])
    after = _snapshot(km, prompts, objects)
    return km, edit, prompts, kinds, before, after


def _controls_kept(before: list[dict], after: list[dict], kinds: list[str]) -> int:
    return sum(b["top"] == a["top"] for b, a, k in zip(before, after, kinds) if k == "control")


def run_update(args: argparse.Namespace) -> int:
    from ..editing import KnowledgeNeuronEditor
    from ..editing.base import EditRequest
    from ..progress import default_reporter

    cfg = _config(args)
    settings = cfg.update
    if args.rule:
        settings.rule = args.rule
    if args.force:
        settings.force = True
    request = EditRequest(args.prompts, args.old, args.new)  # checks old != new before the model loads
    objects = [args.old, args.new]
    editor = KnowledgeNeuronEditor(settings.check(), neurons=_neurons(args), reporter=default_reporter(args.quiet))
    km, edit, prompts, kinds, before, after = _run_with_controls(args, cfg.controls, editor, request, objects)
    info = edit.info["requests"][0]
    con = console()
    con.print(_before_after_table(f"{km.name}: {args.old!r} → {args.new!r} ({settings.rule} rule)", prompts, kinds,
                                  objects, before, after))
    con.print(_neuron_table(f"{len(info['neurons'])} neurons changed", info["neurons"]))
    if info["dropped"]:
        con.print(f"left out as generic: {', '.join(str(d['layer']) + ':' + str(d['index']) for d in info['dropped'])}",
                  highlight=False)
    if info["unpredicted"]:
        con.print(f"[yellow]forced: the model did not predict {args.old!r} on {len(info['unpredicted'])} prompt(s)[/]")
    kept = _controls_kept(before, after, kinds)
    scale = "" if info["scale"] is None else (
        f", change {info['scale']:.3g} × the value vectors' norm" if settings.direction == "gradient"
        else f", scale {info['scale']:.4g}")
    verdict = "[bold green]success[/]" if info["success"] else "[bold red]failed[/]"
    con.print(f"{verdict}: {args.new!r} is top-1 on {sum(m > 0 for m in info['margins'])}/{len(info['margins'])} edit "
              f"prompts{scale}; controls keeping their top prediction: {kept}/{kinds.count('control')}")
    written = _save(km, edit, args)
    con.print(written or "nothing written (use --save DIR or --save-patch FILE to keep the edit)")
    return 0


def run_erase(args: argparse.Namespace) -> int:
    from ..editing import KnowledgeNeuronEraser
    from ..editing.base import EditRequest
    from ..progress import default_reporter

    cfg = _config(args)
    settings = cfg.erase
    if args.mode:
        settings.mode = args.mode
    if args.force:
        settings.force = True
    request = EditRequest(args.prompts, args.target)
    editor = KnowledgeNeuronEraser(settings.check(), neurons=_neurons(args), reporter=default_reporter(args.quiet))
    km, edit, prompts, kinds, before, after = _run_with_controls(args, cfg.controls, editor, request, [args.target])
    info = edit.info["requests"][0]
    con = console()
    con.print(_before_after_table(f"{km.name}: erasing {args.target!r} ({settings.mode})", prompts, kinds,
                                  [args.target], before, after))
    con.print(_neuron_table(f"{len(info['neurons'])} neurons erased", info["neurons"]))
    n = len(request.prompts)
    lowered = sum(a[args.target] < b[args.target] for b, a in zip(before[:n], after[:n]))
    mean_b = sum(b[args.target] for b in before[:n]) / n
    mean_a = sum(a[args.target] for a in after[:n]) / n
    kept = _controls_kept(before, after, kinds)
    con.print(f"P({args.target!r}) lowered on {lowered}/{n} prompts (mean {mean_b:.4f} → {mean_a:.4f}); controls "
              f"keeping their top prediction: {kept}/{kinds.count('control')}")
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
