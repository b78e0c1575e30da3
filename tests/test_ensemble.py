"Tests of `bloodcell_fastai.ensemble` (source: nbs/07b_ensemble.ipynb) on synthetic probabilities with known answers."
import json, math
import numpy as np, pandas as pd, pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score
from bloodcell_fastai.ensemble import *
from bloodcell_fastai.metrics import simulate_probs
from bloodcell_fastai.core import ConfigError

CNMC = ['all', 'hem']


def members(margins=(1.6, 1.2, 0.8), n=400, c=2, seed=0):
    "Seeded targets and one simulated member per margin, with independent noise."
    t = np.random.default_rng(seed).choice(c, n)
    return [simulate_probs(t, c, m, seed=seed + 10 + i) for i, m in enumerate(margins)], t


def one_perfect_case(n=60):
    "Member a is right on every image by a hair; b and c are confidently wrong on a third: only (1, 0, 0) is perfect."
    t = np.zeros(n, int)
    a = np.tile([0.51, 0.49], (n, 1))
    b, c = np.tile([0.9, 0.1], (n, 1)), np.tile([0.6, 0.4], (n, 1))
    b[:n // 3], c[:n // 3] = [0.0, 1.0], [0.0, 1.0]
    return [a, b, c], t


def only_mix_case(reps=5):
    "All targets are class 1; only weights (0.6, 0.4, 0) get every image right."
    p1 = np.repeat(np.array([[0.9, 0.0, 0.5], [0.2, 1.0, 0.5], [0.52, 0.52, 0.0]]), reps, 0)
    return [np.stack([1 - p1[:, j], p1[:, j]], 1) for j in range(3)], np.ones(len(p1), int)


# --- averaging ---------------------------------------------------------------------------------------------------------

def test_average_probs():
    a, b = np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[0.5, 0.5], [0.6, 0.4]])
    np.testing.assert_allclose(average_probs([a, b]), (a + b) / 2)
    np.testing.assert_allclose(average_probs([a, b], [3, 1]), 0.75 * a + 0.25 * b)
    np.testing.assert_allclose(average_probs([a, b], [0.0, 0.0]), (a + b) / 2)
    np.testing.assert_allclose(average_probs([a], None), a)
    np.testing.assert_allclose(average_probs([a, b], [1, 0]).sum(1), 1)
    with pytest.raises(ValueError, match='3 weights for 2 members'): average_probs([a, b], [1, 1, 1])
    with pytest.raises(ValueError, match='non-negative'): average_probs([a, b], [1, -1])
    with pytest.raises(ValueError): average_probs([a, b[:1]])


# --- fitness ------------------------------------------------------------------------------------------------------------

def test_fitness_matches_sklearn():
    probs, t = members(n=300, c=3, margins=(0.7,))
    p, pred = probs[0], probs[0].argmax(1)
    classes = ['all', 'hem', 'other']
    assert get_fitness('accuracy')(p, t) == pytest.approx(accuracy_score(t, pred))
    assert get_fitness('balanced_accuracy')(p, t) == pytest.approx(balanced_accuracy_score(t, pred))
    assert get_fitness('f1_weighted')(p, t) == pytest.approx(f1_score(t, pred, average='weighted'))
    assert get_fitness('f1_macro')(p, t) == pytest.approx(f1_score(t, pred, average='macro'))
    assert get_fitness('precision:hem', classes)(p, t) == pytest.approx(precision_score(t, pred, labels=[1], average=None)[0])
    assert get_fitness('recall:ALL', classes)(p, t) == pytest.approx(recall_score(t, pred, labels=[0], average=None)[0])


def test_hem_precision_binary():
    t = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([[.9, .1], [.4, .6], [.3, .7], [.2, .8], [.6, .4], [.45, .55]])   # predicted 0 1 1 1 0 1
    pred = p.argmax(1)
    assert get_fitness('precision:hem', CNMC)(p, t) == pytest.approx(precision_score(t, pred, pos_label=1)) == 0.5
    assert get_fitness('precision:all', CNMC)(p, t) == pytest.approx(precision_score(t, pred, pos_label=0)) == 0.5
    assert get_fitness('recall:hem', CNMC)(p, t) == pytest.approx(recall_score(t, pred, pos_label=1))
    # a class never predicted has precision 0 (scikit-learn's zero_division=0), not nan
    assert get_fitness('precision:hem', CNMC)(np.tile([0.9, 0.1], (6, 1)), t) == 0


def test_fitness_errors_and_passthrough():
    with pytest.raises(ValueError, match='unknown fitness'): get_fitness('auc')
    with pytest.raises(ValueError, match='needs the class names'): get_fitness('precision:hem')
    with pytest.raises(ValueError, match=r"\['blast'\]"): get_fitness('recall:blast', CNMC)
    f = get_fitness('accuracy')
    assert get_fitness(f) is f


@pytest.mark.parametrize('fitness', ['accuracy', 'balanced_accuracy', 'f1_macro', 'f1_weighted', 'precision:hem', 'recall:all'])
def test_batched_scores_match_sklearn_at_every_grid_point(fitness):
    probs, t = members(n=150)
    W = simplex_grid(3, 0.1)
    batched = score_weights(probs, t, W, fitness, classes=CNMC)
    f = get_fitness(fitness, CNMC)
    np.testing.assert_allclose(batched, [f(average_probs(probs, w), t) for w in W])


def test_score_weights_chunks_and_named_targets():
    probs, t = members(n=200)
    W = simplex_grid(3, 0.1)
    whole = score_weights(probs, t, W)
    np.testing.assert_array_equal(whole, score_weights(probs, t, W, max_cells=1))
    np.testing.assert_array_equal(whole, score_weights(probs, np.array(CNMC)[t], W, classes=CNMC))
    with pytest.raises(ValueError, match='columns for 3 members'): score_weights(probs, t, W[:, :2])


# --- the grid -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('m,step', [(1, 0.05), (2, 0.1), (3, 0.05), (4, 0.05), (3, 0.25)])
def test_simplex_grid(m, step):
    W = simplex_grid(m, step)
    k = round(1 / step)
    assert len(W) == math.comb(k + m - 1, m - 1)
    np.testing.assert_allclose(W.sum(1), 1)
    assert (W >= 0).all()
    np.testing.assert_allclose(W * k, np.round(W * k), atol=1e-9)     # multiples of the step
    assert len(np.unique(np.round(W * k).astype(int), axis=0)) == len(W)


def test_simplex_grid_rejects_bad_step():
    with pytest.raises(ValueError, match='whole number'): simplex_grid(3, 0.3)
    with pytest.raises(ValueError): simplex_grid(3, 2)


def test_grid_finds_the_single_perfect_member():
    probs, t = one_perfect_case()
    res = grid_search_weights(probs, t, names=['a', 'b', 'c'])
    assert res.weights.tolist() == [1.0, 0.0, 0.0] and res.score == 1.0
    assert (res.table.score == 1.0).sum() == 1
    assert list(res.table.columns) == ['a', 'b', 'c', 'score'] and len(res.table) == 231
    # the best member may be any of the three: permute them
    res = grid_search_weights([probs[1], probs[2], probs[0]], t)
    assert res.weights.tolist() == [0.0, 0.0, 1.0]


def test_grid_finds_the_only_optimal_mix():
    probs, t = only_mix_case()
    res = grid_search_weights(probs, t, step=0.05)
    np.testing.assert_allclose(res.weights, [0.6, 0.4, 0.0])
    assert res.score == 1.0 and (res.table.score == 1.0).sum() == 1
    assert get_fitness('accuracy')(average_probs(probs, res.weights), t) == 1.0
    # no mix in the neighbourhood is perfect
    for w in ([0.55, 0.45, 0], [0.65, 0.35, 0], [0.6, 0.35, 0.05]):
        assert get_fitness('accuracy')(average_probs(probs, w), t) < 1


def test_grid_ties_prefer_the_most_uniform_weights():
    probs, t = members(margins=(1.0,), n=100)
    same = probs * 2                                           # identical members: every weight vector ties
    assert grid_search_weights(same, t).weights.tolist() == [0.5, 0.5]
    assert grid_search_weights(probs * 4, t).weights.tolist() == [0.25] * 4
    w = grid_search_weights(probs * 3, t).weights              # 1/3 is off the grid: a nearest point, deterministically
    assert sorted(w.round(2).tolist()) == [0.3, 0.35, 0.35]
    assert grid_search_weights(probs * 3, t).weights.tolist() == w.tolist()


def test_grid_result_is_consistent_with_sklearn_and_step():
    probs, t = members(n=500)
    for fitness in ('accuracy', 'f1_weighted', 'precision:hem'):
        res = grid_search_weights(probs, t, step=0.05, fitness=fitness, classes=CNMC)
        f = get_fitness(fitness, CNMC)
        assert res.score == pytest.approx(f(average_probs(probs, res.weights), t))
        assert res.score == pytest.approx(res.table.score.max())
        assert res.weights.sum() == pytest.approx(1)
        np.testing.assert_allclose(res.weights * 20, np.round(res.weights * 20), atol=1e-9)
        assert res.score >= max(f(p, t) for p in probs)                  # a single member is on the grid


def test_grid_four_members():
    "The 4-member grid at step 0.05 (its speed is measured in benchmarks/, not here)."
    probs, t = members(margins=(1.5, 1.2, 1.0, 0.8), n=2000, c=8)
    res = grid_search_weights(probs, t, step=0.05, fitness='f1_weighted')
    assert len(res.table) == 1771 and list(res.table.columns) == ['m0', 'm1', 'm2', 'm3', 'score']
    assert res.score == pytest.approx(res.table.score.max())
    assert res.score == pytest.approx(get_fitness('f1_weighted')(average_probs(probs, res.weights), t))
    assert res.score >= max(get_fitness('f1_weighted')(p, t) for p in probs)


# --- the GA -------------------------------------------------------------------------------------------------------------

def test_ga_beats_average_and_is_reproducible():
    probs, t = members(n=400)
    avg = get_fitness('accuracy')(average_probs(probs), t)
    a = ga_search_weights(probs, t, population=12, generations=10, seed=3)
    b = ga_search_weights(probs, t, population=12, generations=10, seed=3)
    assert a.score >= avg
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.score == b.score
    assert a.weights.sum() == pytest.approx(1) and (a.weights >= 0).all()
    assert a.score == pytest.approx(get_fitness('accuracy')(average_probs(probs, a.weights), t))
    assert list(a.table.columns) == ['generation', 'best_score'] and a.table.best_score.is_monotonic_increasing


def test_ga_with_class_fitness_and_known_mix():
    probs, t = only_mix_case()
    res = ga_search_weights(probs, t, population=16, generations=15, seed=0)
    assert res.score >= get_fitness('accuracy')(average_probs(probs), t)
    probs, t = members(n=300)
    res = ga_search_weights(probs, np.array(CNMC)[t], fitness='precision:hem', classes=CNMC,
                            population=10, generations=5, seed=1)
    assert res.score == pytest.approx(precision_score(t, average_probs(probs, res.weights).argmax(1), pos_label=1))


def test_ga_single_member():
    probs, t = members(margins=(1.0,), n=50)
    res = ga_search_weights(probs, t)
    assert res.weights.tolist() == [1.0]


# --- the ensemble record ----------------------------------------------------------------------------------------------

def test_ensemble_round_trip_and_predict():
    probs, t = members(n=200)
    e = search_weights(probs, np.array(CNMC)[t], ['r50', 'd121', 'eb0'], CNMC, method='grid', fitness='precision:hem', step=0.1)
    d = json.loads(json.dumps(e.to_dict()))
    assert set(d) == {'members', 'weights', 'classes', 'method', 'fitness', 'score', 'params'}
    assert d['method'] == 'grid' and d['params'] == {'step': 0.1} and d['fitness'] == 'precision:hem'
    e2 = Ensemble.from_dict(d)
    assert e2 == e
    np.testing.assert_allclose(e2.predict_probs(probs), average_probs(probs, e.weights))
    assert e.score == pytest.approx(get_fitness('precision:hem', CNMC)(e.predict_probs(probs), t))


def test_search_weights_methods():
    probs, t = members(n=200)
    names = ['a', 'b', 'c']
    avg = search_weights(probs, t, names, CNMC, method='average')
    assert avg.weights == pytest.approx([1 / 3] * 3) and avg.params == {} and avg.method == 'average'
    ga = search_weights(probs, t, names, CNMC, method='ga', population=8, generations=4, seed=5)
    assert ga.params['population'] == 8 and ga.params['seed'] == 5 and 'mutation' in ga.params
    assert ga.score >= avg.score
    json.dumps(ga.to_dict())
    with pytest.raises(ConfigError, match="unknown search 'stacking': use average, grid, ga"):
        search_weights(probs, t, names, CNMC, method='stacking')
    assert list(SEARCHES) == ['average', 'grid', 'ga'] and SEARCHES['average'] is average_weights
    w = average_weights(probs, t, get_fitness('accuracy'))
    assert w.weights.tolist() == pytest.approx([1 / 3] * 3) and w.table is None
    assert w.score == pytest.approx(get_fitness('accuracy')(average_probs(probs), t)) == pytest.approx(avg.score)


def test_search_weights_table_and_names():
    "Members may be paths (as stored in ensemble.json); `names` label the search's table, and are not a search setting."
    probs, t = members(n=100)
    e = search_weights(probs, t, ['../r50', '../d121', '../eb0'], CNMC, method='grid', step=0.25, names=['r50', 'd121', 'eb0'])
    assert e.members == ['../r50', '../d121', '../eb0'] and e.params == {'step': 0.25}
    assert list(e.table.columns) == ['r50', 'd121', 'eb0', 'score'] and len(e.table) == 15
    assert e.score == pytest.approx(e.table.score.max())
    assert list(search_weights(probs, t, ['x', 'y', 'z'], CNMC, step=0.25).table.columns) == ['x', 'y', 'z', 'score']
    ga = search_weights(probs, t, ['x', 'y', 'z'], CNMC, method='ga', population=6, generations=2, seed=0, names=['p', 'q', 'r'])
    assert list(ga.table.columns) == ['generation', 'best_score'] and 'names' not in ga.params


def test_ensemble_validation():
    with pytest.raises(ValueError, match='sum to 1'): Ensemble(['a', 'b'], [0.5, 0.6], CNMC)
    with pytest.raises(ValueError, match='non-negative'): Ensemble(['a', 'b'], [1.5, -0.5], CNMC)
    with pytest.raises(ValueError, match='2 weights for 3 members'): Ensemble(['a', 'b', 'c'], [0.5, 0.5], CNMC)
    with pytest.raises(ValueError, match='unknown method'): Ensemble(['a'], [1.0], CNMC, method='vote')
    with pytest.raises(ValueError, match='unknown ensemble fields'):
        Ensemble.from_dict(dict(members=['a'], weights=[1.0], classes=CNMC, wieghts=[1.0]))
    e = Ensemble(['a', 'b'], np.array([0.25, 0.75]), CNMC)
    assert e.weights == [0.25, 0.75] and all(type(w) is float for w in e.weights)


def test_plot_grid_scores_smoke():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    probs, t = only_mix_case()
    res = grid_search_weights(probs, t, step=0.1, names=['a', 'b', 'c'])
    ax = plot_grid_scores(res.table)
    x, y = ax.lines[0].get_data()
    assert (x[0], y[0]) == (0.6, 0.4)                 # the star marks the chosen weights
    with pytest.raises(ValueError, match='3 members'): plot_grid_scores(res.table.drop(columns='c'))
    plt.close('all')


def test_search_weights_records_fitness_name():
    probs, t = members(n=100)
    e = search_weights(probs, t, ['a', 'b', 'c'], CNMC, method='grid', fitness=get_fitness('recall:hem', CNMC), step=0.25)
    assert e.fitness == 'recall:hem' and e.params == {'step': 0.25}
    json.dumps(e.to_dict())
