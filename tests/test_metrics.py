"Tests of `bloodcell_fastai.metrics` (source: nbs/00b_metrics.ipynb) against scikit-learn and hand-computed cases."
import json
import numpy as np, pandas as pd, pytest
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, cohen_kappa_score,
                             confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score)
from bloodcell_fastai.metrics import *

CLASSES = ['basophil', 'eosinophil', 'lymphocyte', 'neutrophil']
HEADLINE = ['accuracy', 'balanced_accuracy', 'cohen_kappa', 'error_rate', 'f1_macro', 'f1_weighted', 'roc_auc', 'ece']


def make(n=400, c=4, margin=2.0, temperature=1.0, seed=0, p=None):
    "Seeded targets and calibrated-by-construction probabilities."
    t = np.random.default_rng(seed).choice(c, size=n, p=p)
    return simulate_probs(t, c, margin, temperature, seed=seed + 1), t


# --- hand-computable cases ---------------------------------------------------------------------------------------

def test_small_hand_case():
    # 3 classes, 6 images; predictions 0,0,1,1,2,0 against targets 0,0,1,2,2,2
    probs = np.array([[.8, .1, .1], [.6, .3, .1], [.2, .7, .1], [.1, .6, .3], [.1, .2, .7], [.5, .2, .3]])
    t = np.array([0, 0, 1, 2, 2, 2])
    r = evaluate_probs(probs, t, ['a', 'b', 'c'], n_boot=50)
    assert r['accuracy']['value'] == pytest.approx(4 / 6)
    assert r['error_rate']['value'] == pytest.approx(2 / 6)
    assert r['balanced_accuracy']['value'] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert r['confusion_matrix'] == [[2, 0, 0], [0, 1, 0], [1, 1, 1]]
    # per-class F1: a = 2*2/(2+3) = 0.8, b = 2*1/(1+2) = 2/3, c = 2*1/(3+1) = 0.5
    assert r['per_class']['a']['f1'] == pytest.approx(0.8)
    assert r['per_class']['b']['f1'] == pytest.approx(2 / 3)
    assert r['per_class']['c']['f1'] == pytest.approx(0.5)
    assert r['f1_macro']['value'] == pytest.approx((0.8 + 2 / 3 + 0.5) / 3)
    assert r['f1_weighted']['value'] == pytest.approx((0.8 * 2 + 2 / 3 * 1 + 0.5 * 3) / 6)
    # kappa: po = 4/6, pe = (2*3 + 1*2 + 3*1)/36 = 11/36
    assert r['cohen_kappa']['value'] == pytest.approx((4 / 6 - 11 / 36) / (1 - 11 / 36))
    assert r['per_class']['c'] == dict(precision=1.0, recall=pytest.approx(1 / 3), f1=pytest.approx(0.5), support=3)
    assert r['n_images'] == 6 and r['classes'] == ['a', 'b', 'c']


def test_ece_hand_cases():
    t = np.array([0] * 8 + [1] * 2 + [0] * 6 + [1] * 4)
    calibrated = np.array([[0.8, 0.2]] * 10 + [[0.6, 0.4]] * 10)
    assert expected_calibration_error(calibrated, t) == pytest.approx(0, abs=1e-12)
    overconfident = np.array([[0.99, 0.01]] * 20)          # 14 of 20 right at confidence 0.99
    assert expected_calibration_error(overconfident, t) == pytest.approx(0.99 - 0.7)
    coin = np.array([[0.99, 0.01]] * 10)                    # right half the time at 0.99
    assert expected_calibration_error(coin, np.array([0, 1] * 5)) == pytest.approx(0.49)


def test_ece_bins_and_reliability_table():
    probs, t = make(n=3000, temperature=0.3)
    tab = reliability_table(probs, t, n_bins=10)
    assert list(tab.columns) == ['lower', 'upper', 'count', 'confidence', 'accuracy', 'gap']
    assert tab['count'].sum() == 3000 and len(tab) == 10
    conf = probs.max(1)
    inside = tab.dropna()
    assert ((inside.confidence > inside.lower) & (inside.confidence <= inside.upper)).all()
    ece = (tab['count'] * tab.gap.abs()).fillna(0).sum() / 3000
    assert ece == pytest.approx(expected_calibration_error(probs, t, n_bins=10))
    # an edge value goes to the bin that closes at it: 0.6 is in (0.4, 0.6] with 5 bins
    tab5 = reliability_table(np.array([[0.6, 0.4]]), np.array([0]), n_bins=5)
    assert tab5['count'].tolist() == [0, 0, 1, 0, 0]
    assert (conf > 0).all()


def test_ece_calibrated_vs_overconfident_simulation():
    probs_cal, t = make(n=20000, margin=2.0, temperature=1.0)
    probs_over, _ = make(n=20000, margin=2.0, temperature=0.3)
    assert expected_calibration_error(probs_cal, t) < 0.02
    assert expected_calibration_error(probs_over, t) > 0.1


def test_map_at_n_hand_and_sklearn():
    s, rel = np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 1, 0])
    assert average_precision_at_n(s, rel, 5) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert average_precision_at_n(s, rel, 1) == pytest.approx(1.0)
    assert average_precision_at_n(s, rel, 2) == pytest.approx(0.5)
    assert average_precision_at_n(s, rel[::-1], 5) == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert np.isnan(average_precision_at_n(s, np.zeros(5), 5))
    # ties keep image order (stable): equal scores, relevant image second -> precision 1/2 at rank 2
    assert average_precision_at_n(np.ones(2), np.array([0, 1]), 2) == pytest.approx(0.5)
    probs, t = make(n=300)
    full = np.mean([average_precision_score(t == k, probs[:, k]) for k in range(4)])
    assert mean_average_precision_at_n(probs, t, 300) == pytest.approx(full)
    assert mean_average_precision_at_n(probs, t, 10_000) == pytest.approx(full)
    # a perfect ranking scores 1 at any N
    assert mean_average_precision_at_n(np.eye(4)[t], t, 5) == pytest.approx(1.0)


# --- every metric against scikit-learn -----------------------------------------------------------------------------

def test_point_metrics_match_sklearn():
    probs, t = make(n=500, margin=1.0, p=[0.1, 0.2, 0.3, 0.4])
    pred = probs.argmax(1)
    r = evaluate_probs(probs, t, CLASSES, n_boot=100)
    assert r['accuracy']['value'] == pytest.approx(accuracy_score(t, pred))
    assert r['balanced_accuracy']['value'] == pytest.approx(balanced_accuracy_score(t, pred))
    assert r['cohen_kappa']['value'] == pytest.approx(cohen_kappa_score(t, pred))
    assert r['f1_macro']['value'] == pytest.approx(f1_score(t, pred, average='macro'))
    assert r['f1_weighted']['value'] == pytest.approx(f1_score(t, pred, average='weighted'))
    assert r['roc_auc']['value'] == pytest.approx(roc_auc_score(t, probs, multi_class='ovr', average='macro'))
    assert r['confusion_matrix'] == confusion_matrix(t, pred).tolist()
    p, rc, f, s = precision_recall_fscore_support(t, pred)
    for i, c in enumerate(CLASSES):
        assert r['per_class'][c] == dict(precision=pytest.approx(p[i]), recall=pytest.approx(rc[i]),
                                         f1=pytest.approx(f[i]), support=int(s[i]))


def test_batched_metrics_match_sklearn_on_resamples():
    probs, t = make(n=250, margin=1.0)
    probs = np.round(probs, 2)            # ties in the scores exercise the tie handling of the AUC
    pred = probs.argmax(1)
    counts = bootstrap_counts(len(t), 25, np.random.default_rng(3))
    cs = confusion_scores(batched_confusion(t, pred, counts, 4))
    auc, ece = batched_roc_auc(probs, t, counts), batched_ece(probs, t, counts)
    for b in range(len(counts)):
        i = np.repeat(np.arange(len(t)), counts[b])
        assert cs['accuracy'][b] == pytest.approx(accuracy_score(t[i], pred[i]))
        assert cs['error_rate'][b] == pytest.approx(1 - accuracy_score(t[i], pred[i]))
        assert cs['balanced_accuracy'][b] == pytest.approx(balanced_accuracy_score(t[i], pred[i]))
        assert cs['cohen_kappa'][b] == pytest.approx(cohen_kappa_score(t[i], pred[i]))
        assert cs['f1_macro'][b] == pytest.approx(f1_score(t[i], pred[i], average='macro'))
        assert cs['f1_weighted'][b] == pytest.approx(f1_score(t[i], pred[i], average='weighted'))
        ovr = np.mean([roc_auc_score(t[i] == k, probs[i, k]) for k in range(4)])   # rounded rows need not sum to 1
        assert auc[b] == pytest.approx(ovr)
        assert ece[b] == pytest.approx(expected_calibration_error(probs[i], t[i]))


@pytest.mark.filterwarnings('ignore:y_pred contains classes not in y_true')
def test_batched_scores_handle_class_missing_from_a_resample():
    # class 2 is a single image: many resamples lack it, and sklearn then averages over the classes present
    t = np.array([0] * 20 + [1] * 20 + [2])
    probs = simulate_probs(t, 3, margin=1.0, seed=5)
    pred = probs.argmax(1)
    counts = bootstrap_counts(len(t), 40, np.random.default_rng(0))
    assert (counts[:, -1] == 0).any()
    cs = confusion_scores(batched_confusion(t, pred, counts, 3))
    auc = batched_roc_auc(probs, t, counts)
    for b in range(len(counts)):
        i = np.repeat(np.arange(len(t)), counts[b])
        assert cs['balanced_accuracy'][b] == pytest.approx(balanced_accuracy_score(t[i], pred[i]))
        assert cs['f1_macro'][b] == pytest.approx(f1_score(t[i], pred[i], average='macro', zero_division=0))
        assert auc[b] == pytest.approx(roc_auc_present(probs[i], t[i]))


# --- bootstrap intervals ---------------------------------------------------------------------------------------------

def test_ci_contains_point_and_narrows_with_more_data():
    small = evaluate_probs(*make(n=200, margin=1.5, seed=1), CLASSES, n_boot=500)
    large = evaluate_probs(*make(n=5000, margin=1.5, seed=1), CLASSES, n_boot=500)
    for m in HEADLINE:
        for r in (small, large):
            assert r[m]['ci_low'] <= r[m]['ci_high']
            if m != 'ece':                 # ECE's bootstrap is biased upwards: see the notebook
                assert r[m]['ci_low'] <= r[m]['value'] <= r[m]['ci_high'], m
        assert large[m]['ci_high'] - large[m]['ci_low'] < small[m]['ci_high'] - small[m]['ci_low'], m
    assert large['ece']['ci_low'] <= large['ece']['value'] <= large['ece']['ci_high']


def test_bootstrap_is_seeded_and_level_matters():
    probs, t = make(n=300)
    a = evaluate_probs(probs, t, CLASSES, n_boot=200, seed=7)
    b = evaluate_probs(probs, t, CLASSES, n_boot=200, seed=7)
    c = evaluate_probs(probs, t, CLASSES, n_boot=200, seed=8)
    narrow = evaluate_probs(probs, t, CLASSES, n_boot=200, seed=7, ci=0.5)
    assert a == b and a != c
    width = lambda r: r['accuracy']['ci_high'] - r['accuracy']['ci_low']
    assert width(narrow) < width(a)


def test_bootstrap_chunking_does_not_change_results():
    probs, t = make(n=300)
    one = bootstrap_metrics(probs, t, n_boot=64, seed=0, max_cells=10**9)
    assert len(one) == 64 and list(one.columns) == HEADLINE
    # chunks draw from the same generator in sequence: one chunk per resample gives the same draws
    many = bootstrap_metrics(probs, t, n_boot=64, seed=0, max_cells=300)
    pd.testing.assert_frame_equal(one, many)


def test_bootstrap_large_input():
    "1000 resamples of 2000 images x 8 classes (the size whose speed benchmarks/ measures): one finite row per resample."
    probs, t = make(n=2000, c=8)
    b = bootstrap_metrics(probs, t, n_boot=1000)
    assert b.shape == (1000, len(HEADLINE)) and list(b.columns) == HEADLINE
    assert np.isfinite(b.values).all() and b.values.max() <= 1 and b.drop(columns='cohen_kappa').values.min() >= 0
    point = evaluate_probs(probs, t, [f'c{i}' for i in range(8)], n_boot=0)
    for m in ('accuracy', 'balanced_accuracy', 'f1_macro'):   # the resamples scatter around the point estimate
        assert abs(b[m].mean() - point[m]['value']) < 0.01, m


def test_no_bootstrap():
    r = evaluate_probs(*make(n=50), CLASSES, n_boot=0)
    assert r['accuracy']['ci_low'] is None and r['accuracy']['value'] is not None


# --- corner cases of the data ------------------------------------------------------------------------------------------

def test_roc_auc_class_absent_from_targets():
    probs, t = make(n=400)
    keep = t != 1
    r = evaluate_probs(probs[keep], t[keep], CLASSES, n_boot=100)
    expect = np.mean([roc_auc_score(t[keep] == k, probs[keep, k]) for k in (0, 2, 3)])
    assert r['roc_auc']['value'] == pytest.approx(expect)
    assert r['per_class']['eosinophil']['support'] == 0
    assert r['roc_auc']['ci_low'] <= r['roc_auc']['ci_high']


def test_single_class_targets_give_null_not_crash():
    probs, t = make(n=100)
    only = t == 2
    r = evaluate_probs(probs[only], t[only], CLASSES, n_boot=100)
    assert r['roc_auc'] == dict(value=None, ci_low=None, ci_high=None)
    assert r['accuracy']['value'] == pytest.approx((probs[only].argmax(1) == 2).mean())
    json.dumps(r, allow_nan=False)


def test_targets_as_names_or_indices():
    probs, t = make(n=120)
    names = np.array(CLASSES)[t]
    by_idx = evaluate_probs(probs, t, CLASSES, n_boot=50)
    by_name = evaluate_probs(probs, [n.upper() for n in names], CLASSES, n_boot=50)
    assert by_idx == by_name
    assert list(encode_targets(['Lymphocyte', 'basophil'], CLASSES)) == [2, 0]
    assert list(encode_targets([3.0, 1.0], CLASSES)) == [3, 1]
    with pytest.raises(ValueError, match='out of range'): encode_targets([0, 4], CLASSES)
    with pytest.raises(ValueError, match=r"\['blast'\]"): encode_targets(['blast', 'basophil'], CLASSES)
    with pytest.raises(ValueError, match='4 targets for 3 rows'): evaluate_probs(probs[:3], t[:4], CLASSES)


def test_match_classes():
    assert match_classes(['IG', ' Lymphocyte '], ['lymphocyte', 'ig', 'basophil']) == [1, 0]
    with pytest.raises(ValueError) as e: match_classes(['ig', 'blast', 'hem'], ['ig', 'lymphocyte'])
    assert "['blast', 'hem']" in str(e.value) and 'lymphocyte' in str(e.value)
    with pytest.raises(ValueError, match='differ only in case'): match_classes(['a'], ['a', 'A'])
    with pytest.raises(ValueError, match='repeated'): match_classes(['a', 'A'], ['a', 'b'])


def test_restrict_probs():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0]])
    r = restrict_probs(p, ['basophil', 'ig', 'platelet'], ['IG', 'basophil'])
    np.testing.assert_allclose(r, [[0.375, 0.625], [0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(restrict_probs(p, ['a', 'b', 'c'], ['a', 'b', 'c']), p)
    with pytest.raises(ValueError, match='expected'): restrict_probs(p, ['a', 'b'], ['a'])
    with pytest.raises(ValueError, match=r"\['d'\]"): restrict_probs(p, ['a', 'b', 'c'], ['a', 'd'])


def test_model_with_superset_of_classes():
    model_classes = ['basophil', 'eosinophil', 'ig', 'lymphocyte', 'neutrophil', 'platelet']
    t6 = np.random.default_rng(0).choice([1, 3, 4], size=300)
    probs = simulate_probs(t6, 6, margin=1.5, seed=2)
    data_classes = ['Neutrophil', 'eosinophil', 'LYMPHOCYTE']
    names = np.array(model_classes)[t6]
    r = evaluate_probs(probs, names, data_classes, model_classes=model_classes, n_boot=100)
    assert r['classes'] == data_classes
    sub = probs[:, [4, 1, 3]]
    sub = sub / sub.sum(1, keepdims=True)
    t3 = encode_targets(names, data_classes)
    assert r['accuracy']['value'] == pytest.approx(accuracy_score(t3, sub.argmax(1)))
    assert r['roc_auc']['value'] == pytest.approx(roc_auc_score(t3, sub, multi_class='ovr'))
    assert r['ece']['value'] == pytest.approx(expected_calibration_error(sub, t3))
    with pytest.raises(ValueError, match=r"\['blast'\]"):
        evaluate_probs(probs, names, ['neutrophil', 'blast'], model_classes=model_classes)
    with pytest.raises(ValueError, match='model_classes'):
        evaluate_probs(probs, names, data_classes)


def test_present_option():
    probs, t = make(n=400)
    keep = np.isin(t, [0, 3])
    r = evaluate_probs(probs[keep], t[keep], CLASSES, present=True, n_boot=50)
    assert r['classes'] == ['basophil', 'neutrophil'] and len(r['confusion_matrix']) == 2
    sub = probs[keep][:, [0, 3]]
    sub = sub / sub.sum(1, keepdims=True)
    assert r['accuracy']['value'] == pytest.approx(accuracy_score(t[keep] == 3, sub.argmax(1) == 1))


def test_report_contract_and_json():
    r = evaluate_probs(*make(n=300), CLASSES, n_boot=100)
    assert list(r) == HEADLINE + ['per_class', 'classes', 'confusion_matrix', 'n_images', 'map_at', 'precision_at']
    for m in HEADLINE:
        assert set(r[m]) == {'value', 'ci_low', 'ci_high'}
        assert all(isinstance(v, float) for v in r[m].values())
    assert set(r['map_at']) == set(r['precision_at']) == {'5', '100'}
    assert r['classes'] == CLASSES and r['n_images'] == 300
    assert set(r['per_class']['basophil']) == {'precision', 'recall', 'f1', 'support'}
    s = json.dumps(r, allow_nan=False)
    assert json.loads(s) == r
    tab = metrics_table(r)
    assert list(tab.index) == HEADLINE and list(tab.columns) == ['value', 'ci_low', 'ci_high']


def test_bad_probs_rejected():
    probs, t = make(n=10)
    with pytest.raises(ValueError, match='non-negative'): evaluate_probs(probs - 1, t, CLASSES)
    with pytest.raises(ValueError): evaluate_probs(probs[:, :3], t, CLASSES)


def test_plot_reliability_smoke():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    probs, t = make(n=300, temperature=0.5)
    ax = plot_reliability(probs, t, n_bins=10)
    assert 'ECE' in ax.get_title() and len(ax.patches) == 20     # accuracy and gap bars for 10 bins
    plt.close('all')
