"Evaluating a trained run on another lab's labelled folder, down to a folder holding a single class."
import json, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest
from bloodcell_fastai.evaluate import evaluate_run
from bloodcell_fastai.export import load_safe
from bloodcell_fastai.inference import predict_probs, prepare_items


def test_evaluate_run_on_a_one_class_folder(tiny_run, pbc_root, tmp_path, capsys):
    "mylab/neutrophil/*.jpg: four neutrophils scored against an 8-class model; predicting any other class is an error."
    cls = tmp_path/'mylab'/'neutrophil'; cls.mkdir(parents=True)
    fs = [f for f in sorted((pbc_root/'neutrophil').glob('*.jpg')) if not f.name.startswith('.')][-4:]
    for f in fs: shutil.copy(f, cls/f.name)
    rep = evaluate_run(tiny_run, data=tmp_path/'mylab', n_boot=20)
    assert rep['shared_classes'] == ['neutrophil'] and rep['n_model_classes'] == 8 and rep['n_images'] == 4
    assert set(rep['per_class']) == {'neutrophil'} and np.array(rep['confusion_matrix']).shape == (2, 2)
    model, meta = load_safe(tiny_run)
    p = predict_probs(model, meta, prepare_items(pd.DataFrame({'file': [str(cls/f.name) for f in fs]}), meta))
    right = (p.argmax(1) == meta.classes.index('neutrophil')).mean()
    assert rep['accuracy']['value'] == pytest.approx(right)
    assert rep['per_class']['neutrophil']['recall'] == pytest.approx(right) and rep['per_class']['neutrophil']['support'] == 4
    # the same through the command line, which finds the class root below a wrapper folder
    from bloodcell_fastai.cli import main
    assert main(['evaluate', str(tiny_run), '--data', str(tmp_path), '--json', str(tmp_path/'m.json'), '--n-boot', '20']) == 0
    m = json.loads((tmp_path/'m.json').read_text())
    assert m['shared_classes'] == ['neutrophil'] and m['accuracy']['value'] == pytest.approx(right)
    assert '4 images' in capsys.readouterr().out


def test_evaluate_with_tta_is_seeded_and_is_predict_with_tta(tiny_run):
    "`n_tta`: the same seeded figure twice, equal to averaging the plain and augmented passes of `predict_probs`."
    from fastai.torch_core import set_seed
    from bloodcell_fastai.export import labelled_items
    a, b = (evaluate_run(tiny_run, n_tta=2, n_boot=20) for _ in range(2))
    assert a['accuracy'] == b['accuracy'] and a['ece'] == b['ece']
    model, meta = load_safe(tiny_run); df = labelled_items(tiny_run, split='test')
    set_seed(0); p = predict_probs(model, meta, prepare_items(df, meta), n_tta=2)
    plain = predict_probs(model, meta, prepare_items(df, meta))
    assert not np.allclose(p, plain)  # the augmented passes changed the probabilities
    assert a['accuracy']['value'] == pytest.approx((p.argmax(1) == np.array([meta.classes.index(l) for l in df.label])).mean())
