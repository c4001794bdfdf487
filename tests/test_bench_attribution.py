"""evaluations/bench_attribution.py --stability: the selections it compares are locate's at each step count."""

import kn_edit
from helpers import evaluation_script
from kn_edit.data.records import FactRecord


def test_stability_compares_locate_at_each_step_count(tiny_factory):
    bench = evaluation_script("bench_attribution")
    km = tiny_factory("llama")
    facts = [FactRecord("a", "France", "capital", "Paris", ("The capital of France is", "France's capital is")),
             FactRecord("b", "Japan", "capital", "Tokyo", ("The capital of Japan is",))]
    found = bench.stability(km, facts, [2, 20])
    for m in (2, 20):
        assert found[m][0] == [set(kn_edit.locate(km, list(f.prompts), f.object, steps=m)) for f in facts]
    rows = {r[0]: r for r in bench.stability_rows(found)}
    assert rows["20"][1] == "2/2" and rows["20"][2] == "1.000"
    same = sum(a == b for a, b in zip(found[2][0], found[20][0]))
    assert rows["2"][1] == f"{same}/2"
