"""Compare the knowledge-neuron update rules on smollm2-135m over ParaRel facts the model knows.

For every rule (and filter setting): edit success (new object top-1 on every edit prompt; and on held-out
paraphrases), the share of the other facts' prompts that keep their top-1 prediction, and the relative change
of plain-text perplexity. Every edit is reverted (and checked bit for bit) before the next.

    .venv/bin/python evaluations/edit_rules.py                 # writes evaluations/results/edit_rules.{json,md}
    .venv/bin/python evaluations/edit_rules.py --facts 8 --steps 5 --out /tmp/quick   # a quick look

Located neurons are cached in the results folder (edit_rules_neurons.json), so a rerun only re-edits.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kn_edit  # noqa: E402
from kn_edit import EditError, Neuron  # noqa: E402
from kn_edit.models.likelihood import mean_text_nll  # noqa: E402
from kn_edit.data import choose_new_object, expressible, load_pararel, relation_objects  # noqa: E402
from kn_edit.data.requests import prompt_top1  # noqa: E402
from kn_edit.editing import KnowledgeNeuronEditor, Located, ledger_for, make_editor  # noqa: E402
from kn_edit.editing.base import EditRequest  # noqa: E402
from kn_edit.editing.targets import margins, update_target  # noqa: E402
from kn_edit.locating.locate import locate_detailed  # noqa: E402
from kn_edit.models.prompts import AnswerStep, encode_prompt_only  # noqa: E402

RELATIONS = ["P36", "P103", "P37", "P1412", "P30", "P17", "P364", "P140", "P495", "P27"]

# Plain text for the perplexity drift: everyday prose, no facts of the edited kinds.
PLAIN_TEXT = [
    "On Saturday morning we walked to the market to buy vegetables, bread and a few flowers for the kitchen "
    "table. It was sunny but cold, and most people were wearing scarves and gloves.",
    "The recipe is simple: mix the flour with a pinch of salt, add the eggs one at a time, and stir slowly until "
    "the batter is smooth. Let it rest for half an hour before cooking.",
    "When you start a new job, it helps to ask questions early, write down what you learn, and get to know the "
    "people you work with. Most problems are easier to solve together.",
    "The children spent the whole afternoon building a small wooden boat. When it was finished, they carried it "
    "down to the pond and watched it float across the water.",
    "Regular exercise improves sleep, mood and concentration. Even a short walk after dinner can make a "
    "difference, especially for people who sit at a desk all day.",
]

# name → (rule, settings overrides, use the shared-neuron filter); a rule "method:NAME" is the registry's
# method NAME (kn_edit.editing.registry) with those overrides, which locates on its own.
CONFIGS = {
    "kn-subject (64 neurons widened where text moves > 1 %; layer 5)": ("method:kn-subject", {}, False),
    "kn-subject (64 neurons at the subject; layer 5)": ("method:kn-subject", {"widen_above": None}, False),
    "kn-subject (256 neurons)": ("method:kn-subject", {"neurons": 256}, False),
    "kn-subject (768 neurons)": ("method:kn-subject", {"neurons": 768}, False),  # half of smollm2's layer
    "kn-subject (16 neurons)": ("method:kn-subject", {"neurons": 16}, False),
    "kn-subject (layer 3)": ("method:kn-subject", {"layer": 3}, False),
    "kn-subject (no guard)": ("method:kn-subject", {"max_text_change": None}, False),
    "kn-subject (fit=rows)": ("method:kn-subject", {"fit": "rows"}, False),
    # a more confident v*: the optimisation runs until P(new) ≈ 0.99 on the rewrite rows (default: ≈ 0.95)
    "kn-subject (stop_loss 0.01; 50 steps)": ("method:kn-subject", {"stop_loss": 0.01, "steps": 50}, False),
    "kn-subject (kl_factor 0; stop_loss 0.01; 50 steps)": ("method:kn-subject", {"stop_loss": 0.01, "steps": 50,
                                                                                 "kl_factor": 0.0}, False),
    "kn-subject (fit=rows; 10 prefixes)": ("method:kn-subject", {"fit": "rows", "n_prefixes": 10}, False),
    "rome (layer 5)": ("method:rome", {}, False),
    "signed (no guard)": ("signed", {"max_text_change": None}, False),
    "signed (default)": ("signed", {}, False),
    "signed (no generic filter)": ("signed", {"generic_filter": False}, False),
    "signed + shared filter": ("signed", {}, True),
    "signed (sign weighting)": ("signed", {"weighting": "sign"}, False),
    "signed (gradient least-norm)": ("signed", {"preserve": False}, False),
    "signed (contrast direction: earlier default)": ("signed", {"direction": "contrast"}, False),
    "signed (margin 0.5)": ("signed", {"margin": 0.5}, False),
    "paper (all neurons)": ("paper", {"generic_filter": False}, False),
    "paper (generic filter)": ("paper", {}, False),
    "unscaled (all neurons)": ("unscaled", {"generic_filter": False}, False),
    "unscaled (generic filter)": ("unscaled", {}, False),
}


DEFAULT_CONFIGS = ["signed (default)", "kn-subject (64 neurons widened where text moves > 1 %; layer 5)", "signed + shared filter", "signed (gradient least-norm)",
                   "signed (contrast direction: earlier default)", "paper (all neurons)", "unscaled (all neurons)"]


def select_facts(km, root: Path, n_facts: int, per_relation: int, scan: int, seed: int, max_prompts: int):
    """Facts whose object the model predicts on some edit prompts; those prompts (at most max_prompts) are edited."""
    facts = expressible(km, load_pararel(root, relations=RELATIONS, seed=seed))
    pool = relation_objects(facts.records)
    chosen = []
    for relation in RELATIONS:
        records = [r for r in facts.records if r.relation == relation]
        random.Random(f"{seed}:{relation}").shuffle(records)
        records = records[:scan]
        flags = prompt_top1(km, [(p, r.object) for r in records for p in r.prompts])
        at, got = 0, 0
        for r in records:
            good = [p for p, ok in zip(r.prompts, flags[at : at + len(r.prompts)]) if ok][:max_prompts]
            at += len(r.prompts)
            if not good or got >= per_relation:
                continue
            new = choose_new_object(r, pool[relation], seed)
            try:
                update_target(km, good, r.object, new)
            except kn_edit.KnEditError:
                continue
            chosen.append({"fact_id": r.fact_id, "relation": relation, "subject": r.subject, "old": r.object,
                           "new": new, "prompts": good, "heldout": list(r.heldout_prompts)})
            got += 1
    return chosen[:n_facts]


def locate_all(km, facts, steps: int, cache: Path) -> dict[str, dict]:
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    for i, f in enumerate(facts):
        key = f"{f['fact_id']}|steps={steps}|{'|'.join(f['prompts'])}"
        if key not in known:
            t = time.time()
            r = locate_detailed(km, f["prompts"], f["old"], threshold=0.2, share=0.5, steps=steps)
            known[key] = {"neurons": [[n.layer, n.index] for n in r.neurons], "scores": r.mean_scores}
            cache.write_text(json.dumps(known))
            print(f"  located {i + 1}/{len(facts)} {f['subject']!r} → {f['old']!r}: {len(r.neurons)} neurons "
                  f"({time.time() - t:.0f}s)", flush=True)
        f["located"] = known[key]
    return {f["fact_id"]: f["located"] for f in facts}


def perplexity(km, texts) -> float:
    return math.exp(mean_text_nll(km, texts))


def top1(km, prompts) -> list[int]:
    steps = [AnswerStep(*encode_prompt_only(km.tokenizer, p, km.is_masked_lm), -1) for p in prompts]
    return km.step_logits(steps).argmax(dim=-1).tolist()


def heldout_success(km, fact) -> list[tuple[str, bool]]:
    """(prompt, new object top-1) for each held-out paraphrase the tokenizer can pose the edit on."""
    out = []
    for p in fact["heldout"]:
        try:
            t = update_target(km, [p], fact["old"], fact["new"])
        except kn_edit.KnEditError:
            continue
        out.append((p, bool(margins(km, t.new_steps)[0] > 0)))
    return out


def mark_known_heldout(km, facts) -> None:
    """fact["heldout_known"]: the held-out paraphrases the unedited model answers with the old object (top-1).
    ParaRel's paraphrases include many the model gets wrong even before an edit; an edit keyed on the subject
    need not reach those, so the held-out share is also reported over the known ones."""
    pairs = [(p, f["old"]) for f in facts for p in f["heldout"]]
    flags = prompt_top1(km, pairs) if pairs else []
    at = 0
    for f in facts:
        f["heldout_known"] = [p for p, ok in zip(f["heldout"], flags[at : at + len(f["heldout"])]) if ok]
        at += len(f["heldout"])


def object_slot_next(km, prompts, objects) -> list[bool]:
    """Per prompt: is the unedited model's top-1 next token the first token of one of ``objects`` (the relation's
    ParaRel objects, right or wrong)? Where it is not, the model continues with a function word or punctuation,
    e.g. "Alexander Island is located in the continent" → " of": the template's answer slot is not the next token,
    and an edit that made an object the top-1 there would be breaking the grammar, not generalizing."""
    steps, firsts = [], []  # per prompt: its answer step (the prompt alone as input) and the objects' first tokens
    for prompt in prompts:
        first = [s for s in (_first_step(km, prompt, obj) for obj in objects) if s is not None]
        steps.append(first[0] if first else None)
        firsts.append({s.target_id for s in first})
    asked = [s for s in steps if s is not None]
    tops = iter(km.step_logits(asked).argmax(dim=-1).tolist() if asked else [])
    return [s is not None and next(tops) in ids for s, ids in zip(steps, firsts)]


def _first_step(km, prompt: str, target: str):
    """The first answer step of ``target`` after ``prompt``, or None where the tokenizer cannot express it."""
    try:
        return km.encode(prompt, target).steps[0]
    except kn_edit.KnEditError:
        return None


def mark_slot_heldout(km, facts, root: Path, seed: int) -> None:
    """fact["heldout_slot"]: the held-out paraphrases where the unedited model's next token is an object of the
    fact's relation (object_slot_next): those an edit of the object can show on. Contains the known ones."""
    pools = relation_objects(load_pararel(root, relations=sorted({f["relation"] for f in facts}), seed=seed).records)
    for f in facts:
        f["heldout_slot"] = [p for p, ok in zip(f["heldout"], object_slot_next(km, f["heldout"], pools[f["relation"]]))
                             if ok]


def share_kept(now, before, which) -> float | None:
    """Share of the prompts picked by ``which`` whose top-1 prediction did not change (None: none picked)."""
    picked = [a == b for a, b, w in zip(now, before, which) if w]
    return sum(picked) / len(picked) if picked else None


def run_config(km, facts, name, rule, overrides, shared_filter, base_top, base_ppl, all_sets):
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    rows = []
    for i, fact in enumerate(facts):
        located = fact["located"]
        neurons = [Neuron(l, j) for l, j in located["neurons"]]
        loc = lambda *_a, _n=neurons, _s=located["scores"]: Located(list(_n), list(_s))  # noqa: E731
        relation_neurons = {"all": all_sets} if shared_filter else None
        if rule.startswith("method:"):
            editor = make_editor(rule.partition(":")[2], overrides=dict(overrides))
        else:
            editor = KnowledgeNeuronEditor(rule=rule, locator=loc, relation_neurons=relation_neurons, **overrides)
        request = EditRequest(fact["prompts"], fact["old"], fact["new"], subject=fact["subject"],
                              relation="all" if shared_filter else None)
        state = {k: v.detach().clone() for k, v in km.model.named_parameters() if "down_proj" in k}
        row = {"fact_id": fact["fact_id"], "old": fact["old"], "new": fact["new"]}
        try:
            edit = editor.apply(km, [request])
        except EditError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        report = edit.report
        info = report.details.requests[0]
        text_change = getattr(report.details, "text_change", None)
        others = [p for g in facts if g is not fact for p in g["prompts"]]
        now = top1(km, others)
        before = [base_top[p] for p in others]
        same = [g["old"] == fact["old"] for g in facts if g is not fact for _ in g["prompts"]]
        held = heldout_success(km, fact)
        ppl = perplexity(km, PLAIN_TEXT)
        edit.revert()
        assert all(torch.equal(v, state[k]) for k, v in km.model.named_parameters() if k in state), "revert failed"
        known, slot = set(fact.get("heldout_known", [])), set(fact.get("heldout_slot", []))
        split = {kind: [ok for p, ok in held if (p in known) == want] for kind, want in (("known", True), ("unknown", False))}
        split["slot"] = [ok for p, ok in held if p in slot]
        rows.append({**row, "success": report.success, "prompt_success": report.prompt_success,
                     "heldout_success": mean([ok for _, ok in held]),
                     "heldout_known_success": mean(split["known"]), "heldout_unknown_success": mean(split["unknown"]),
                     "n_heldout_known": len(split["known"]), "n_heldout_unknown": len(split["unknown"]),
                     "heldout_slot_success": mean(split["slot"]), "n_heldout_slot": len(split["slot"]),
                     "kept": sum(a == b for a, b in zip(now, before)) / len(others),
                     "kept_other_object": share_kept(now, before, [not x for x in same]),
                     "kept_same_object": share_kept(now, before, same),
                     "ppl_change": ppl / base_ppl - 1, "guard_text_change": text_change,
                     "scale": getattr(info, "scale", None), "n_neurons": len(report.neurons) or None,
                     "n_dropped": len(getattr(info, "dropped", [])), "negative": getattr(info, "negative_activations", None),
                     "seconds": report.seconds})
    applied = [r for r in rows if "error" not in r]
    held = [r["heldout_success"] for r in applied if r["heldout_success"] is not None]
    summary = {
        "rule": rule, "overrides": overrides, "shared_filter": shared_filter, "n_facts": len(rows),
        "n_errors": len(rows) - len(applied),
        "success": sum(bool(r.get("success")) for r in rows) / len(rows),
        "prompt_success": mean([r.get("prompt_success", 0.0) for r in rows]),
        "heldout_success": mean(held),
        "heldout_known_success": mean([r["heldout_known_success"] for r in applied
                                       if r.get("heldout_known_success") is not None]),
        "heldout_unknown_success": mean([r["heldout_unknown_success"] for r in applied
                                         if r.get("heldout_unknown_success") is not None]),
        "n_heldout_known": sum(r.get("n_heldout_known", 0) for r in applied),
        "n_heldout_unknown": sum(r.get("n_heldout_unknown", 0) for r in applied),
        "heldout_slot_success": mean([r["heldout_slot_success"] for r in applied
                                      if r.get("heldout_slot_success") is not None]),
        "n_heldout_slot": sum(r.get("n_heldout_slot", 0) for r in applied),
        "kept": mean([r["kept"] for r in applied]),
        "kept_other_object": mean([r["kept_other_object"] for r in applied if r["kept_other_object"] is not None]),
        "kept_same_object": mean([r["kept_same_object"] for r in applied if r["kept_same_object"] is not None]),
        "ppl_change_mean": mean([r["ppl_change"] for r in applied]),
        "ppl_change_median": sorted(r["ppl_change"] for r in applied)[len(applied) // 2] if applied else None,
        "ppl_change_max": max((r["ppl_change"] for r in applied), default=None),
        "neurons_mean": mean([r["n_neurons"] for r in applied if r["n_neurons"] is not None]),
    }
    return summary, rows


def markdown(meta, summaries) -> str:
    lines = [
        "# Knowledge-neuron update rules on smollm2-135m",
        "",
        f"{meta['n_facts']} ParaRel facts the model knows ({', '.join(meta['relations'])}), 1–{meta['prompts']} edit "
        "prompts each (those the model answers correctly), "
        f"new object another object of the same relation; neurons located with integrated gradients "
        f"(m = {meta['steps']} steps, t = 0.2, p = 0.5). Generated by `evaluations/edit_rules.py` "
        f"({meta['seconds']:.0f} s on {meta['device']}).",
        "",
        "| rule | success | prompts flipped | held-out paraphrases (all / known before / not known / object next) | other facts kept (all / other object / same object) | plain-text ppl change (mean / median / max) | neurons edited | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    def fmt(x, pct=True) -> str:
        if x is None:
            return "–"
        if pct and abs(x) >= 100:  # wrecked models: 1e40 % is clearer than 40 digits
            return f"{100 * x:.1e} %"
        return f"{100 * x:.1f} %" if pct else f"{x:.1f}"

    for name, s in summaries.items():
        lines.append(f"| {name} | {fmt(s['success'])} | {fmt(s['prompt_success'])} | {fmt(s['heldout_success'])} / "
                     f"{fmt(s.get('heldout_known_success'))} / {fmt(s.get('heldout_unknown_success'))} / "
                     f"{fmt(s.get('heldout_slot_success'))} | "
                     f"{fmt(s['kept'])} / {fmt(s.get('kept_other_object'))} / {fmt(s.get('kept_same_object'))} | {fmt(s['ppl_change_mean'])} / {fmt(s['ppl_change_median'])} / {fmt(s.get('ppl_change_max'))} | "
                     f"{fmt(s['neurons_mean'], False)} | {s['n_errors']} |")
    lines += ["", "success: the new object is the top-1 prediction on every edit prompt. Held-out paraphrases: the "
              "new object top-1, over all of the fact's other ParaRel paraphrases, over those the unedited model "
              "answered with the old object, over those it did not, and over those where its next token was an object of the "
              "relation, right or wrong (the others continue with a function word: \"... is located in the continent\" → \" of\"; "
              "per fact, then over facts). Other facts kept: the share of "
              "the other facts' edit prompts whose top-1 prediction is unchanged, over all of them, those with another "
              "object than the edited fact's old one, and those with the same object (e.g. other facts answered "
              "'French' when one 'French' fact is edited). Errors: edits refused (no neuron left after filtering, or "
              "the margin not reached within the limits); they count as failures and are left out of kept/ppl. "
              "`signed + shared filter`: the paper's relation-share filter with all facts here as the relation (neurons "
              "located for more than 10 % of them are not edited) and its default fallback (where the neurons left "
              "cannot reach the margin, all located neurons are edited; without the fallback 8 of the 25 edits are "
              "refused, success 68 %, other facts kept 91.5 % / 94.3 % / 41.7 %). `gradient least-norm`: the default without the "
              "preservation metric (least plain norm). The `contrast` direction was the default before. `kn-subject`: "
              "the knowledge neurons of layer 5 located at the subject's last token, their value vectors changed by "
              "the least change on Wikipedia text that moves the layer's output by ROME's δ on the subject's key "
              "(kn_edit/editing/subject_neurons.py); `rome`: ROME at the same layer.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pararel"))
    parser.add_argument("--facts", type=int, default=40)
    parser.add_argument("--per-relation", type=int, default=4)
    parser.add_argument("--scan", type=int, default=20, help="facts read per relation to find known ones")
    parser.add_argument("--prompts", type=int, default=2, help="edit prompts per fact (those the model gets right)")
    parser.add_argument("--steps", type=int, default=5, help="integrated-gradients steps for locating")
    parser.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "evaluations" / "results"))
    args = parser.parse_args()
    # checked before the minutes of selecting and locating (a config's name holds no comma)
    chosen = [c.strip() for c in args.configs.split(",")] if args.configs else DEFAULT_CONFIGS
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown --configs {unknown}; choose from: {' | '.join(CONFIGS)}")
    t0 = time.time()
    torch.manual_seed(args.seed)
    km = kn_edit.load(args.model, device="cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The chosen facts are cached too (choosing reads and checks all of ParaRel: minutes on CPU).
    chosen_cache = out / "edit_rules_facts.json"
    chosen_key = f"{args.model}|{args.data}|{args.facts}|{args.per_relation}|{args.scan}|{args.seed}|{args.prompts}"
    known = json.loads(chosen_cache.read_text()) if chosen_cache.is_file() else {}
    if chosen_key not in known:
        known[chosen_key] = select_facts(km, Path(args.data), args.facts, args.per_relation, args.scan, args.seed,
                                         args.prompts)
        chosen_cache.write_text(json.dumps(known))
    facts = known[chosen_key]
    mark_known_heldout(km, facts)
    mark_slot_heldout(km, facts, Path(args.data), args.seed)
    print(f"{len(facts)} facts selected ({time.time() - t0:.0f}s)", flush=True)
    locate_all(km, facts, args.steps, out / "edit_rules_neurons.json")
    all_sets = [{Neuron(l, j) for l, j in f["located"]["neurons"]} for f in facts]
    every = sorted({p for f in facts for p in f["prompts"]})
    base_top = dict(zip(every, top1(km, every)))
    base_ppl = perplexity(km, PLAIN_TEXT)
    summaries, details = {}, {}
    for name in chosen:
        rule, overrides, shared = CONFIGS[name]
        t = time.time()
        summaries[name], details[name] = run_config(km, facts, name, rule, overrides, shared, base_top, base_ppl, all_sets)
        print(f"{name}: {json.dumps(summaries[name])} ({time.time() - t:.0f}s)", flush=True)
    assert not ledger_for(km).active_edits
    meta = {"model": args.model, "n_facts": len(facts), "relations": sorted({f["relation"] for f in facts}),
            "steps": args.steps, "prompts": args.prompts, "seed": args.seed, "base_ppl": base_ppl, "device": "CPU",
            "seconds": time.time() - t0, "facts": [{k: f[k] for k in ("fact_id", "subject", "old", "new", "prompts")}
                                                    for f in facts]}
    (out / "edit_rules.json").write_text(json.dumps({"meta": meta, "summary": summaries, "facts": details}, indent=1))
    (out / "edit_rules.md").write_text(markdown(meta, summaries))
    print(markdown(meta, summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
