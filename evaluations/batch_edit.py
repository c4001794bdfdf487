"""Many facts in one edit against one edit per fact, on smollm2-135m (issue 13): MEMIT's batch update and the
knowledge-neuron editor's joint solve (``batch=joint``), each against the same method applied to every fact alone.

Per method and way (batch: all N facts in one ``Editor.apply``; single: each fact alone, reverted before the next):

* success: share of the facts whose new object is the greedy answer on every edit prompt, every token (the edit
  report's per-prompt success, the same measure for every method);
* held-out top-1: new object top-1 on the facts' held-out paraphrases;
* kept: of other facts of the edited relations that the model answered right before (same old object / another
  object; evaluations/rome_check.py's neighbours, never an edited fact), the share still answered right — after
  the batch edit for ``batch``, after each fact's own edit for ``single`` (the same pairs, pooled);
* text ppl: relative change of Wikipedia perplexity (held-out slice; batch: once; single: mean over the edits);
* seconds: the edit's own time (batch: one edit; single: the sum over the N edits);
* refitted (MEMIT): how many facts its first solve left short and were solved again (``refit``; batch: in the one
  edit, single: over the N edits).

Every edit is reverted and the model checked bit for bit before the next.

    .venv/bin/python evaluations/batch_edit.py --facts 20               # evaluations/results/batch_edit.{json,md}
    .venv/bin/python evaluations/batch_edit.py --facts 100 --methods memit --per-relation 10   # the issue's full run
    .venv/bin/python evaluations/batch_edit.py ... --methods kn-subject --append   # add a method's rows to --out

Facts: evaluations/rome_check.py's selection (evaluations/edit_rules.py's relations, seed and known prompts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evaluations"))

import kn_edit  # noqa: E402
from kn_edit.data.requests import prompt_top1  # noqa: E402
from kn_edit.editing import EditRequest, ledger_for, make_editor  # noqa: E402
from kn_edit.editing.knowledge_neurons import default_locator  # noqa: E402

from rome_check import add_fact_arguments, perplexity, prepare  # noqa: E402

# method → settings that make its batch solve (the kn and kn-subject editors' default is already batch=joint)
METHODS = {"memit": {}, "kn": {"batch": "joint"}, "kn-subject": {"batch": "joint"}, "rome": {}}
# the editor's per-fact step that depends only on the unedited model and the fact (MemoTargets)
PER_FACT_STEP = {"memit": "_target", "kn-subject": "_prepare"}


def memo_locator():
    """The default locator, each fact located once (batch and single edits edit the same neurons)."""
    seen: dict = {}

    def locate(km, prompts, target, settings):
        key = (tuple(prompts), target, settings.steps, settings.threshold, settings.share)
        if key not in seen:
            seen[key] = default_locator(km, prompts, target, settings)
        return seen[key]

    return locate


class MemoTargets:
    """A fact's per-fact step computed once: MEMIT's target (δ optimised like ROME's v*,
    kn_edit.editing.memit.editor) or kn-subject's neurons, keys and δ (``batch=joint``: found on the unedited
    model for every request, kn_edit.editing.subject_neurons).

    Every edit here starts from the unedited model (each is reverted, bit for bit, before the next), and that step
    depends only on that model and the fact, so the batch edit and the fact's single edit get the very same result.
    Reusing it saves the single edits ~N optimisations; the time the first one took is added to the single edit's
    seconds (``reused_seconds``), so both ways are timed as if computed afresh."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.seen: dict = {}
        self.reused_seconds = 0.0

    def wrap(self, editor) -> None:
        compute = getattr(editor, self.step)

        def once(km, *args):
            # the request (MEMIT) or one subject's requests (kn-subject: one δ for them all), and the layer / flags
            asked = [r for a in args for r in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(r, EditRequest)]
            key = (tuple(a for a in args if isinstance(a, int)),
                   tuple((r.subject, tuple(r.prompts), r.new) for r in asked))
            if key in self.seen:
                found, seconds = self.seen[key]
                self.reused_seconds += seconds
            else:
                t = time.perf_counter()
                found = compute(km, *args)
                self.seen[key] = found, time.perf_counter() - t
            # copies: MEMIT fills in ``remaining`` per edit
            return [dataclasses.replace(f) for f in found] if isinstance(found, list) else dataclasses.replace(found)

        setattr(editor, self.step, once)


def request_of(fact) -> EditRequest:
    return EditRequest(tuple(fact["prompts"]), fact["old"], fact["new"], subject=fact["subject"], relation=fact["relation"])


def state_of(km) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in km.model.named_parameters()}


def reverted(km, edit, state) -> None:
    edit.revert()
    changed = [k for k, v in km.model.named_parameters() if not torch.equal(v, state[k])]
    assert not changed and not ledger_for(km).active_edits, f"revert failed: {changed[:3]}"


def refitted(report) -> int | None:
    """How many requests MEMIT solved again (``refit``); None for the methods without a refit."""
    found = getattr(report.details, "refitted", None)
    return None if found is None else len(found)


def per_fact_success(report, facts) -> list[bool]:
    out, at = [], 0
    for f in facts:
        n = len(f["prompts"])
        out.append(all(p.success for p in report.prompts[at : at + n]))
        at += n
    return out


def measure(km, facts, text, base_ppl) -> dict:
    held = [(p, f["new"]) for f in facts for p in f["heldout"]]
    same = [x for f in facts for x in f["same"]]
    other = [x for f in facts for x in f["other"]]
    return {"heldout_top1": prompt_top1(km, held) if held else [], "same_kept": prompt_top1(km, same) if same else [],
            "other_kept": prompt_top1(km, other) if other else [], "ppl_change": perplexity(km, *text) / base_ppl - 1}


def editor_for(name, extras, memo):
    editor = make_editor(name, overrides=METHODS[name], **extras)
    if memo is not None:
        memo.wrap(editor)
    return editor


def run_batch(km, name, facts, text, base_ppl, extras, memo=None) -> dict:
    editor = editor_for(name, extras, memo)
    reused = memo.reused_seconds if memo is not None else 0.0
    state = state_of(km)
    try:
        edit = editor.apply(km, [request_of(f) for f in facts])
    except kn_edit.KnEditError as exc:
        return {"refused": str(exc)}
    got = measure(km, facts, text, base_ppl)
    reused = (memo.reused_seconds - reused) if memo is not None else 0.0
    got.update(success=per_fact_success(edit.report, facts), seconds=edit.report.seconds + reused,
               peak_memory_mb=edit.report.peak_memory_mb, refitted=refitted(edit.report))
    reverted(km, edit, state)
    return got


def run_single(km, name, facts, text, base_ppl, extras, memo=None) -> dict:
    editor = editor_for(name, extras, memo)
    rows = {"success": [], "heldout_top1": [], "same_kept": [], "other_kept": [], "ppl_change": [], "seconds": 0.0,
            "refused": 0, "refitted": None}
    for i, f in enumerate(facts):
        state = state_of(km)
        reused = memo.reused_seconds if memo is not None else 0.0
        try:
            edit = editor.apply(km, [request_of(f)])
        except kn_edit.KnEditError:
            rows["refused"] += 1
            rows["success"].append(False)
            got = measure(km, [f], text, base_ppl)  # the model is unchanged: its neighbours are all kept
        else:
            rows["success"].append(per_fact_success(edit.report, [f])[0])
            if refitted(edit.report) is not None:
                rows["refitted"] = (rows["refitted"] or 0) + refitted(edit.report)
            rows["seconds"] += edit.report.seconds + ((memo.reused_seconds - reused) if memo is not None else 0.0)
            got = measure(km, [f], text, base_ppl)
            reverted(km, edit, state)
        for key in ("heldout_top1", "same_kept", "other_kept"):
            rows[key] += got[key]
        rows["ppl_change"].append(got["ppl_change"])
        print(f"    single {name} [{i + 1}/{len(facts)}] {f['subject']!r} success={rows['success'][-1]}", flush=True)
    return rows


def summary(got: dict) -> dict:
    if isinstance(got.get("refused"), str):
        return {"refused": got["refused"]}
    share = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    ppl = got["ppl_change"]
    return {"success": share(got["success"]), "heldout_top1": share(got["heldout_top1"]),
            "same_kept": share(got["same_kept"]), "n_same": len(got["same_kept"]),
            "other_kept": share(got["other_kept"]), "n_other": len(got["other_kept"]),
            "ppl_change": share(ppl) if isinstance(ppl, list) else ppl, "seconds": got["seconds"],
            "refused": got.get("refused", 0) if not isinstance(got.get("refused"), str) else None,
            "refitted": got.get("refitted")}


def markdown(meta, results) -> str:
    pct = lambda x: "–" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    lines = [
        "# Batch edits on smollm2-135m: N facts in one edit vs one edit per fact",
        "",
        f"{meta['n_facts']} ParaRel facts the model knows ({', '.join(meta['relations'])}), at most {meta['prompts']} "
        "edit prompts each, new object another object of the same relation; neighbours: other facts of the edited "
        f"relations the model answered right. Text perplexity: {meta['text_passages']} held-out Wikipedia passages "
        f"cut at {meta['text_tokens']} tokens (before: {meta['base_ppl']:.2f}). `evaluations/batch_edit.py "
        f"{meta['argv']}` (settings besides the defaults: {meta['settings']}), {meta['seconds']:.0f} s wall, CPU, {meta['threads']} thread, machine shared with other jobs.",
        "",
        "| method | way | success | held-out top-1 | same-object kept | other-object kept | text ppl change | seconds (all N) | refused |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, ways in results.items():
        for way, s in ways.items():
            if "success" not in s:
                lines.append(f"| {name} | {way} | refused: {s['refused']} | | | | | | |")
                continue
            lines.append(f"| {name} | {way} | {pct(s['success'])} | {pct(s['heldout_top1'])} | {pct(s['same_kept'])} "
                         f"(n={s['n_same']}) | {pct(s['other_kept'])} (n={s['n_other']}) | {100 * s['ppl_change']:+.2f} % | "
                         f"{s['seconds']:.0f} | {s['refused'] if s['refused'] is not None else '–'} |")
    refits = [f"{name} {way}: {s['refitted']} of {meta['n_facts']}" for name, ways in results.items()
              for way, s in ways.items() if s.get("refitted") is not None]
    if refits:
        lines += ["", f"Facts MEMIT solved again (`refit`, the first solve left them short): {'; '.join(refits)}."]
    lines += ["", "batch: one edit of all N facts (MEMIT: one update per critical layer; kn: one joint least-change "
              "solve; kn-subject: one least-change solve over the union of the facts' subject neurons); single: each fact edited alone and reverted (kept and text ppl: mean over the N edits).", ""]
    return "\n".join(lines)


def earlier_results(path: Path, meta: dict, methods: list[str], ways: list[str]) -> tuple[dict, dict, dict]:
    """(results, raw, meta) of an earlier run in ``path`` without the (method, way) pairs of ``methods`` ×
    ``ways`` (rerun now), its meta joined with this run's; exits with a message if it was run on other facts."""
    earlier = json.loads(path.read_text())
    ids = lambda m: [f["fact_id"] for f in m["facts"]]  # noqa: E731
    # the text's perplexity is compared to 1e-4: another CPU's BLAS rounds it differently in the 6th digit, and
    # each row's change is taken against its own run's measurement
    if ids(earlier["meta"]) != ids(meta) or abs(earlier["meta"]["base_ppl"] / meta["base_ppl"] - 1) > 1e-4:
        sys.exit(f"error: {path} holds results for other facts or text; run without --append or use another --out")
    def keep(d: dict) -> dict:
        kept = {m: {w: x for w, x in v.items() if not (m in methods and w in ways)} for m, v in d.items()}
        return {m: v for m, v in kept.items() if v}

    joined = {**meta, "argv": f"{earlier['meta']['argv']}`, then `{meta['argv']}",
              "settings": {**earlier["meta"]["settings"], **meta["settings"]},
              "seconds": earlier["meta"]["seconds"]}  # fmt: skip
    return keep(earlier["summary"]), keep(earlier["raw"]), joined


def setting(item: str) -> tuple[str, str, object]:
    """``METHOD:KEY=VALUE`` → (method, key, value): numbers, lists, true / false / null as JSON, anything else as
    a string (``memit:refit=prompts``; ``memit:refit=null`` is the paper's one solve)."""
    method, _, assignment = item.partition(":")
    key, _, value = assignment.partition("=")
    if method not in METHODS or not key or not value:
        sys.exit(f"error: --set {item!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(METHODS)}")
    try:
        return method, key, json.loads(value)
    except json.JSONDecodeError:
        return method, key, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fact_arguments(parser, neighbours=2, text_passages=12)
    parser.add_argument("--methods", default="memit,kn", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--ways", default="batch,single")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="a setting of one method, e.g. memit:mom2_update_weight=150 (repeatable)")
    parser.add_argument("--append", action="store_true",
                        help="keep the results already in --out of the methods and ways not run now (same facts)")
    args = parser.parse_args()
    t0 = time.time()
    km, facts, text, base_ppl = prepare(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "n_facts": len(facts), "relations": sorted({f["relation"] for f in facts}),
            "prompts": args.prompts, "seed": args.seed, "base_ppl": base_ppl, "threads": args.threads,
            "text_passages": args.text_passages, "text_tokens": args.text_tokens, "argv": " ".join(sys.argv[1:]),
            "facts": [{k: f[k] for k in ("fact_id", "subject", "old", "new", "prompts", "heldout", "same", "other")}
                      for f in facts]}
    for item in args.set:
        method, key, value = setting(item)
        METHODS[method] = {**METHODS[method], key: value}
    meta["settings"] = {m: METHODS[m] for m in args.methods.split(",")}
    results: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    if args.append and (out / "batch_edit.json").is_file():
        results, raw, meta = earlier_results(out / "batch_edit.json", meta, args.methods.split(","),
                                             [w.strip() for w in args.ways.split(",")])
        t0 -= meta["seconds"]
    for name in [m.strip() for m in args.methods.split(",")]:
        extras = {"locator": memo_locator()} if name == "kn" else {}
        memo = MemoTargets(PER_FACT_STEP[name]) if name in PER_FACT_STEP else None
        for way in [w.strip() for w in args.ways.split(",")]:
            t = time.time()
            print(f"{name} {way}:", flush=True)
            run = run_batch if way == "batch" else run_single
            got = run(km, name, facts, text, base_ppl, extras, memo)
            raw.setdefault(name, {})[way] = got
            results.setdefault(name, {})[way] = summary(got)
            print(f"{name} {way}: {json.dumps(results[name][way])} ({time.time() - t:.0f}s)", flush=True)
            meta["seconds"] = time.time() - t0
            (out / "batch_edit.json").write_text(json.dumps({"meta": meta, "summary": results, "raw": raw}, indent=1))
            (out / "batch_edit.md").write_text(markdown(meta, results))
    print(markdown(meta, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
