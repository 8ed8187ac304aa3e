"""The score behind mislabel_candidates finds planted wrong labels: 10 % of the
bundled digits' training labels flipped, the demo MLP (which does not fit
them) and a wide MLP (which fits most of them) trained with `reptrace train`,
the ROC AUC of the canned query's ranking computed here from the flipped ids
(scripts/eval/mislabel.py, the evaluation docs/benchmarks.md reports)."""
import importlib.util

from kit import ROOT

spec = importlib.util.spec_from_file_location("mislabel", ROOT / "scripts/eval/mislabel.py")
mislabel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mislabel)


def test_mislabel_candidates_find_flipped_labels_in_both_regimes(reptrace_bin, tmp_path):
    table, flipped, fits = mislabel.evaluate(str(reptrace_bin), tmp_path)
    assert len(flipped) == 144
    demo, wide = list(mislabel.REGIMES)
    # The two regimes differ as intended: one ignores the wrong labels, one fits them.
    assert fits[demo] < 0.2 and fits[wide] > 0.6, fits
    canned = table["mislabel_candidates (the canned query)"]
    assert canned[demo] >= 0.97 and canned[wide] >= 0.97, canned
    # The attribution's self share is not one-signed across the regimes: the
    # self-opposed tail finds the labels the demo MLP does not fit.
    assert table["self share (self-opposed tail), fc3"][demo] > 0.9
    assert table["self share (memorised tail), fc3"][demo] < 0.1
