"""`kn-edit update-fact`, `kn-edit erase-fact`, `kn-edit apply-patch` and `kn-edit revert-patch`.

Edits happen in memory; nothing is written unless --save DIR (the whole edited model) or --save-patch FILE
(the edit alone) is given. The method is chosen by name (--method; kn_edit.editing.registry; default: kn-subject
for causal LMs, kn for masked LMs, kn-erase for erase-fact); its settings come from its defaults
(configs/methods/NAME.yaml states them), --config FILE and key=value overrides such as margin=2 (kn) or layer=6
(rome). Where the method reads the subject and --subject is not given, it is found from the prompts
(kn_edit.locating.subject); a fact the model does not predict is refused unless --force (kn_edit.editing.front).
The default output is the before/after table and one result line, 80 columns wide; --verbose adds every table of
the edit's report (the same for every method), --json prints the report alone.
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import TYPE_CHECKING

from .ui import add_model_argument, add_prompts_argument, add_settings_arguments, console, report_tables, table

if TYPE_CHECKING:
    from ..models.model import KnModel

WIDTH = 80  # the default output fits a terminal this wide, whatever the terminal
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


def _add_fact(parser: argparse.ArgumentParser, default_method: str | None) -> None:
    from ..editing.registry import METHODS

    add_prompts_argument(parser, required=False)
    parser.add_argument("--facts", metavar="FILE.jsonl", help="edit every fact of this file in one batch (the user "
                        "fact-file format of kn_edit/data/jsonl.py, plus \"new\" per line for update-fact); one patch")
    default = default_method or "kn-subject for causal LMs, kn for masked LMs (kn with --neurons)"
    parser.add_argument("--method", default=default_method, metavar="NAME",
                        help=f"editing method: {', '.join(METHODS)}, or module:Class (default: {default})")
    parser.add_argument("--subject", "-s", help="the fact's subject as it appears in the prompts (kn-subject, rome, "
                                                "memit; default: found from the prompts)")
    parser.add_argument("--neurons", metavar="L:I,L:I", help="knowledge-neuron methods: edit these neurons instead of "
                                                             "locating them")
    parser.add_argument("--force", action="store_true", help="edit even where the model's greedy answer on the edit "
                                                             "prompts is not the old object")
    parser.add_argument("--control", action="append", dest="controls", metavar="PROMPT",
                        help="an unrelated prompt whose top prediction should survive (repeat; default: five built in)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", "-v", action="store_true", help="also the method's tables: parameters changed, "
                                                                     "each prompt's margin, neurons, solver details")
    parser.add_argument("--json", action="store_true", help="print the edit's report as JSON only (for scripts)")


def _add_save(parser: argparse.ArgumentParser, patch: bool = True) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--save", metavar="DIR", help="write the edited model to this new folder")
    if patch:
        group.add_argument("--save-patch", metavar="FILE", help="write the edit as a patch file (safetensors)")


def register(sub: argparse._SubParsersAction) -> None:
    update = sub.add_parser("update-fact", help="change a fact the model knows (old → new); by default kn-subject "
                                                "(causal LMs: knowledge neurons at the subject, found from the prompts) "
                                                "or kn (masked LMs); shows predictions before and after")
    add_model_argument(update)
    _add_fact(update, None)
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
    if args.force and "force" in {f.name for f in fields(method_config(args.method))}:
        overrides.append("force=true")  # the knowledge-neuron methods also check it themselves
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
    """Per prompt: top prediction and P(object) for each object (as ``km.predict`` and ``km.prob`` give them), every
    prompt's answer slot and every object's teacher-forced tokens in one batched pass."""
    import math

    import torch

    from ..models.prompts import AnswerStep, context_length, encode_prompt_only

    heads = [AnswerStep(*encode_prompt_only(km.tokenizer, p, km.is_masked_lm, context_length(km.model)), -1)
             for p in prompts]  # fmt: skip
    steps = [(i, o, step) for i, p in enumerate(prompts) for o in objects for step in km.encode(p, o).steps]
    logits = km.step_logits(heads + [step for _, _, step in steps])
    top_p, top = torch.softmax(logits[: len(heads)], dim=-1).max(dim=-1)
    rows = [{"top": km.tokenizer.decode([int(t)]), "top_p": float(p)} for t, p in zip(top, top_p)]
    gold = torch.tensor([step.target_id for _, _, step in steps], dtype=torch.long, device=logits.device)
    token_logp = torch.log_softmax(logits[len(heads):], dim=-1).gather(1, gold[:, None])[:, 0].tolist()
    summed: dict[tuple[int, str], float] = {}
    for (i, o, _), logp in zip(steps, token_logp):  # P(object): the product over its teacher-forced tokens
        summed[i, o] = summed.get((i, o), 0.0) + logp
    for (i, o), logp in summed.items():
        rows[i][o] = math.exp(logp)
    return rows


def _token(text: str) -> str:
    """A predicted token as a reader wants it: stripped, or quoted where it is only whitespace."""
    return text.strip() or repr(text)


def _before_after_table(title: str, prompts: list[str], kinds: list[str], objects: list[str], before, after):
    """Prompt, top prediction before and after, P(object) before → after: fits 80 columns (a long title, prompt
    or token is cut with an ellipsis, never wrapped); the control prompts (dim) follow the edit prompts after a
    blank line."""
    from rich import box
    from rich.table import Table

    rows = []
    for prompt, kind, b, a in zip(prompts, kinds, before, after):
        cells = [f"{_token(b['top'])} {b['top_p']:.2f}", f"{_token(a['top'])} {a['top_p']:.2f}"]
        rows.append((prompt, kind, cells + [f"{b[o]:.2f}→{a[o]:.2f}" for o in objects]))
    names = ["before", "after"] + [f"P({o})" for o in objects]
    widths = [min(12, max(len(name), *(len(r[2][j]) for r in rows))) for j, name in enumerate(names)]
    title = title if len(title) <= WIDTH else title[: WIDTH - 1] + "…"
    out = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                collapse_padding=True)
    longest = max(len(p) for p in prompts)  # the prompt column takes what the others leave of 80 columns
    out.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=max(12, min(longest, WIDTH - sum(widths) - 2 * len(widths) - 1)))
    for j, (name, width) in enumerate(zip(names, widths)):
        out.add_column(name, no_wrap=True, overflow="ellipsis", min_width=width, max_width=width,
                       justify="left" if j < 2 else "right")
    for i, (prompt, kind, cells) in enumerate(rows):
        out.add_row(prompt if kind == "edit" else f"[dim]{prompt}[/]", *cells,
                    end_section=i + 1 < len(rows) and rows[i + 1][1] != kind)
    return out


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
def _prepare(args: argparse.Namespace, request):
    """What update-fact and erase-fact share before the edit: the editor (built before the model loads where the
    method is named, so bad settings fail fast), the model, the save path checked, the subject found where the
    method needs one and none is given, and (updates) the refusal of a fact the model does not predict.
    Returns (km, editor, request, guess)."""
    from ..editing.front import default_method, refuse_unknown, with_subjects

    editor = _editor(args) if args.method else None
    km = _load(args, args.quiet)
    _check_save(km, args)
    if editor is None:
        args.method = "kn" if args.neurons else default_method(km)  # --neurons: the knowledge-neuron method
        editor = _editor(args)
    (request,), (guess,) = with_subjects(km, [request], args.method)
    if not request.is_erasure:
        refuse_unknown(km, [request], args.force)
    return km, editor, request, guess


def _run_with_controls(args: argparse.Namespace, km: KnModel, editor, request, objects: list[str]):
    """Snapshot the edit and control prompts, apply, snapshot again. Returns (edit, prompts, kinds, before, after)."""
    controls = [_control_prompt(km, c) for c in (args.controls or DEFAULT_CONTROLS)]
    prompts = list(request.prompts) + controls
    kinds = ["edit"] * len(request.prompts) + ["control"] * len(controls)
    before = _snapshot(km, prompts, objects)
    edit = editor.apply(km, [request])
    after = _snapshot(km, prompts, objects)
    return edit, prompts, kinds, before, after


def _controls_kept(before: list[dict], after: list[dict], kinds: list[str]) -> int:
    return sum(b["top"] == a["top"] for b, a, k in zip(before, after, kinds) if k == "control")


def _subject_line(request, guess) -> str | None:
    if guess is not None:
        return guess.describe()
    return f"subject: {request.subject!r} (given)" if request.subject else None


def _print_result(args: argparse.Namespace, km: KnModel, edit, table_, lines: list[str], extra: dict,
                  head: str | None = None) -> None:
    """The default output (``head``, the before/after table, then ``lines``), --verbose (the method's tables
    too), or --json (the report and ``extra`` as one JSON object, nothing else on stdout)."""
    written = _save(km, edit, args)
    if args.json:
        print(json.dumps({"model": km.name, **extra, "report": edit.report.to_dict(), "written": written}))
        return
    con = console()
    if head:
        con.print(head)
    if table_ is not None:
        con.print(table_)
    if args.verbose:
        for part in report_tables(edit.report):
            con.print(part)
    for line in lines:
        con.print(line)
    con.print(written or "nothing written (use --save DIR or --save-patch FILE to keep the edit)")


def _rows(prompts: list[str], kinds: list[str], before: list[dict], after: list[dict]) -> list[dict]:
    return [{"prompt": p, "kind": k, "before": b, "after": a} for p, k, b, a in zip(prompts, kinds, before, after)]


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
    if args.json:
        args.quiet = True  # stdout holds the JSON alone; no progress bars either


def run_batch(args: argparse.Namespace, erase: bool) -> int:
    """--facts FILE: every fact of the file in one edit (one patch), judged by the edit's report."""
    from ..data.jsonl import load_edit_requests, read_jsonl
    from ..editing.front import default_method, refuse_unknown, with_subjects
    from ..editing.report import request_successes

    editor = _editor(args) if args.method else None
    for _ in read_jsonl(args.facts):  # a missing, folder or malformed file fails before the model loads
        pass
    km = _load(args, args.quiet)
    _check_save(km, args)
    requests = load_edit_requests(args.facts, km.is_masked_lm, erase=erase)  # a malformed line: nothing applied
    if editor is None:
        args.method = "kn" if args.neurons else ("kn-erase" if erase else default_method(km))
        editor = _editor(args)
    requests, guesses = with_subjects(km, requests, args.method)
    if not erase:
        refuse_unknown(km, requests, args.force)
    controls = [_control_prompt(km, c) for c in (args.controls or DEFAULT_CONTROLS)]
    before = _snapshot(km, controls, [])
    edit = editor.apply(km, requests)
    after = _snapshot(km, controls, [])
    report = edit.report
    kept = _controls_kept(before, after, ["control"] * len(controls))
    by_request = request_successes(requests, report.prompts)
    verdict = "[bold green]success[/]" if report.success else "[bold red]failed[/]"
    found = [g.describe() for g in guesses if g is not None]
    lines = ([f"subjects found for {len(found)} facts: {', '.join(repr(r.subject) for r, g in zip(requests, guesses) if g)}"]
             if found else [])  # fmt: skip
    lines.append(f"{verdict}: {sum(by_request)}/{len(requests)} facts hold on every prompt "
                 f"({sum(p.success for p in report.prompts)}/{len(report.prompts)} prompts); controls kept: "
                 f"{kept}/{len(controls)} ({report.method}, {report.seconds:.1f} s)")
    extra = {"subjects": [r.subject for r in requests], "controls_kept": kept, "controls": len(controls)}
    _print_result(args, km, edit, None, lines, extra)
    return 0


def run_update(args: argparse.Namespace) -> int:
    from ..data.records import EditRequest

    _one_fact_or_file(args, ("old", "new"))
    if args.facts:
        return run_batch(args, erase=False)
    # checks old != new before the model loads
    request = EditRequest(args.prompts, args.old, args.new, subject=args.subject)
    km, editor, request, guess = _prepare(args, request)
    objects = [args.old, args.new]
    edit, prompts, kinds, before, after = _run_with_controls(args, km, editor, request, objects)
    report = edit.report
    kept = _controls_kept(before, after, kinds)
    verdict = "[bold green]success[/]" if report.success else "[bold red]failed[/]"
    held = sum(p.success for p in report.prompts)
    lines = [f"{verdict}: {args.new!r} on {held}/{len(report.prompts)} edit prompts, controls kept "
                 f"{kept}/{kinds.count('control')} ({report.method}, {report.seconds:.1f} s)"]
    title = f"{km.name}: {args.old!r} → {args.new!r} ({report.method})"
    extra = {"subject": request.subject, "subject_found": guess is not None, "controls_kept": kept,
             "predictions": _rows(prompts, kinds, before, after)}
    _print_result(args, km, edit, _before_after_table(title, prompts, kinds, objects, before, after), lines, extra,
                  _subject_line(request, guess))
    return 0


def run_erase(args: argparse.Namespace) -> int:
    from ..data.records import EditRequest
    from ..errors import ConfigError

    _one_fact_or_file(args, ("target",))
    if args.facts:
        return run_batch(args, erase=True)
    request = EditRequest(args.prompts, args.target, subject=args.subject)
    km, editor, request, guess = _prepare(args, request)
    if not editor.can_erase:
        raise ConfigError(f"{editor.name} cannot erase facts; use an erasing method (kn-erase)")
    edit, prompts, kinds, before, after = _run_with_controls(args, km, editor, request, [args.target])
    report = edit.report
    n = len(request.prompts)
    lowered = sum(a[args.target] < b[args.target] for b, a in zip(before[:n], after[:n]))
    mean_b = sum(b[args.target] for b in before[:n]) / n
    mean_a = sum(a[args.target] for a in after[:n]) / n
    kept = _controls_kept(before, after, kinds)
    lines = [f"P({args.target!r}) lowered on {lowered}/{n} prompts (mean {mean_b:.4f} → {mean_a:.4f}); no longer "
                 f"top-1 on {sum(p.success for p in report.prompts)}/{n}; controls kept {kept}/{kinds.count('control')} "
                 f"({report.method}, {report.seconds:.1f} s)"]
    title = f"{km.name}: erasing {args.target!r} ({report.method})"
    extra = {"subject": request.subject, "subject_found": guess is not None, "controls_kept": kept,
             "predictions": _rows(prompts, kinds, before, after)}
    _print_result(args, km, edit, _before_after_table(title, prompts, kinds, [args.target], before, after), lines,
                  extra, _subject_line(request, guess))
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
