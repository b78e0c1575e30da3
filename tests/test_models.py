"Tests for `bloodcell_fastai.models`: registry, weight policy, normalisation stats, parameter groups, learner."
import pickle, warnings

import pytest
import timm
import torch
from torch import nn
from safetensors.torch import save_file
from fastai.data.core import DataLoaders
from fastai.torch_core import norm_bias_params
from fastai.vision.core import imagenet_stats

from bloodcell_fastai.core import BloodcellError, ModelFileError
from bloodcell_fastai.models import ARCHS, Arch, CheckpointError, WeightsUnavailableError, bloodcell_learner, bloodcell_splitter, count_groups, create_model, get_arch, list_archs, model_splitter, model_stats, param_groups, read_state_dict, trainable_groups

SMALL = ['resnet18', 'mobilenetv2', 'mobilenetv3_small', 'vit_tiny_2blocks', 'cnn_scratch', 'lenet5']
BIG = ['vit_large_patch16_224', 'vit_large_patch32_224', 'convnext_large', 'resnet152', 'vgg16_bn', 'mixer_b16_224']


def synth_dls(n=8, size=32, c=4, bs=4):
    "8 random images, `c` classes: enough for a `Learner`"
    ds = list(zip(torch.randn(n, 3, size, size), torch.arange(n) % c))
    dls = DataLoaders.from_dsets(ds, ds, bs=bs, device='cpu')
    dls.c = c
    return dls


def assert_partition(model, groups):
    "Every parameter of `model` is in exactly one of `groups` (lists of tensors)"
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no group"


@pytest.fixture(scope='module')
def r18_ckpt(tmp_path_factory):
    "A resnet18 with a 1000-class head, saved as .pth and .safetensors"
    d = tmp_path_factory.mktemp('ckpt')
    m = create_model('resnet18', 1000)
    torch.save(m.state_dict(), d/'r18.pth')
    save_file(m.state_dict(), d/'r18.safetensors')
    return m, d


# ---------------------------------------------------------------- registry

def test_registry_has_the_studies_architectures():
    want = {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet50_chopped', 'vgg16_bn', 'mobilenetv2',
            'mobilenetv3', 'mobilenetv3_small', 'convnext_tiny', 'convnext_small', 'convnext_base', 'convnext_large',
            'vit_base_patch16_224', 'vit_base_patch32_224', 'vit_large_patch16_224', 'vit_large_patch32_224',
            'mixer_b16_224', 'vit_tiny_patch16_224', 'vit_tiny_2blocks', 'cnn_scratch', 'lenet5'}
    assert want <= set(ARCHS)
    assert ARCHS['mobilenetv2'].timm_name == 'mobilenetv2_100'
    assert ARCHS['mobilenetv3'].timm_name == 'mobilenetv3_large_100'
    df = list_archs()
    assert set(df.index) == set(ARCHS) and {'timm_name', 'family', 'size', 'fixed_size'} <= set(df.columns)


@pytest.mark.parametrize('key', list(ARCHS))
def test_registry_entry_is_consistent_with_timm(key):
    a = ARCHS[key]
    assert a.family in {'cnn', 'vit', 'mixer', 'baseline'}
    assert a.is_cnn != a.is_transformer and a.is_transformer == (a.family in ('vit', 'mixer'))
    if a.timm_name is None:
        assert a.family == 'baseline' and a.builder is not None
        return
    assert timm.is_model(a.timm_name), a.timm_name
    cfg = timm.models.get_pretrained_cfg(a.timm_name)
    assert a.fixed_size == bool(cfg.fixed_input_size)
    assert a.size == cfg.input_size[-1]


@pytest.mark.parametrize('key', list(ARCHS))
def test_every_entry_builds_and_outputs_n_out_on_meta(key):
    # meta device: shapes only, no memory, so even ViT-L and VGG-16 are cheap
    with torch.device('meta'):
        m = create_model(key, 8, img_size=128)
        assert m(torch.empty(2, 3, 128, 128)).shape == (2, 8)


@pytest.mark.parametrize('key', SMALL)
def test_small_entries_run_for_real(key):
    m = create_model(key, 5, img_size=64).eval()
    with torch.no_grad(): y = m(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 5) and torch.isfinite(y).all()


def test_get_arch_accepts_timm_names_and_suggests_on_typos():
    assert get_arch('mobilenetv3_large_100').key == 'mobilenetv3'
    a = get_arch('deit_tiny_patch16_224')  # outside the registry
    assert a.family == 'vit' and a.fixed_size
    with pytest.raises(KeyError, match='resnet18'): get_arch('resnet_18')


def test_vit_gets_img_size():
    with torch.device('meta'): m = create_model('vit_base_patch32_224', 3, img_size=128)
    assert m.patch_embed.img_size == (128, 128) and m.pos_embed.shape[1] == 1 + 4*4
    assert m(torch.empty(1, 3, 128, 128, device='meta')).shape == (1, 3)
    m = create_model('vit_tiny_patch16_224', 3, img_size=64).eval()
    with torch.no_grad(): assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)


# ---------------------------------------------------------------- baselines and chopping

@pytest.mark.parametrize('key', ['cnn_scratch', 'lenet5'])
@pytest.mark.parametrize('size', [64, 128])
def test_baselines_any_size(key, size):
    m = create_model(key, 7).eval()
    with torch.no_grad(): assert m(torch.randn(3, 3, size, size)).shape == (3, 7)


def test_cnn_scratch_structure():
    m = create_model('cnn_scratch', 7)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert sum(isinstance(l, nn.MaxPool2d) for l in m.modules()) == 4
    assert any(isinstance(l, nn.Dropout) for l in m.modules())


def test_chopped_resnet50_has_1024_features():
    with torch.device('meta'): m_meta = create_model('resnet50', 8, chop_last=True)
    assert m_meta.num_features == 1024
    m = create_model('resnet50_chopped', 8).eval()
    assert m.num_features == 1024 and m.fc.in_features == 1024
    assert not any(True for _ in m.layer4.parameters())
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert m.forward_features(x).shape[1] == 1024 and m(x).shape == (1, 8)


def test_chop_last_rejected_for_non_resnets():
    with pytest.raises(ValueError, match='ResNet'): create_model('mobilenetv3_small', 8, chop_last=True)
    with pytest.raises(ValueError, match='ResNet'): create_model('lenet5', 8, chop_last=True)


# ---------------------------------------------------------------- parameter groups

def test_resnet18_groups():
    m = create_model('resnet18', 8)
    g = param_groups(m)
    assert list(g) == ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
    assert g['head'] == ['fc.weight', 'fc.bias']
    assert_partition(m, bloodcell_splitter(m))


def test_vit_groups():
    m = create_model('vit_tiny_patch16_224', 8, img_size=64)
    g = param_groups(m)
    assert list(g) == ['stem'] + [f'blocks.{i}' for i in range(12)] + ['head']
    assert set(g['head']) == {'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}  # final norm goes with the head
    assert {'cls_token', 'pos_embed', 'patch_embed.proj.weight'} <= set(g['stem'])
    assert_partition(m, bloodcell_splitter(m))
    m2 = create_model('vit_tiny_2blocks', 8, img_size=64)
    assert list(param_groups(m2)) == ['stem', 'blocks.0', 'blocks.1', 'head']


@pytest.mark.parametrize('key,n', [('resnet50', 6), ('resnet50_chopped', 5), ('vgg16_bn', 7), ('mobilenetv2', 9),
                                   ('mobilenetv3', 9), ('convnext_tiny', 6), ('vit_base_patch16_224', 14),
                                   ('vit_large_patch32_224', 26), ('mixer_b16_224', 14), ('cnn_scratch', 6), ('lenet5', 4)])
def test_group_counts_and_partition(key, n):
    with torch.device('meta'): m = create_model(key, 8)
    groups = bloodcell_splitter(m)
    assert len(groups) == n
    assert_partition(m, groups)
    names = list(param_groups(m))
    assert names[-1] == 'head'
    cls = m.pretrained_cfg['classifier'] if hasattr(m, 'pretrained_cfg') else 'head'
    assert any(p is m.get_parameter(cls + '.weight') for p in groups[-1]), 'classifier is not in the last group'


def test_model_splitter():
    assert model_splitter('resnet18') is bloodcell_splitter
    with pytest.raises(KeyError): model_splitter('no_such_model')
    assert pickle.loads(pickle.dumps(bloodcell_splitter)) is bloodcell_splitter  # learn.export pickles the splitter


# ---------------------------------------------------------------- freezing

@pytest.mark.parametrize('key,n', [('resnet18', 6), ('vit_tiny_2blocks', 4)])
def test_freeze_to_trains_exactly_the_last_groups(key, n):
    learn = bloodcell_learner(synth_dls(), key, img_size=32, train_bn=False)
    assert count_groups(learn) == n
    learn.freeze_to(-2)
    groups = learn.opt.param_lists
    assert len(groups) == n
    for i, g in enumerate(groups):
        assert all(p.requires_grad == (i >= n - 2) for p in g), f'group {i}'
    assert trainable_groups(learn) == [False]*(n-2) + [True]*2
    frozen = [p.requires_grad for p in learn.model.parameters()]
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())
    assert frozen != [p.requires_grad for p in learn.model.parameters()]  # freeze_to(-2) differs from unfreeze


def test_freeze_with_train_bn_keeps_only_norms_trainable():
    learn = bloodcell_learner(synth_dls(), 'resnet18')  # fastai default train_bn=True
    learn.freeze_to(-2)
    norms = {id(p) for p in norm_bias_params(learn.model, with_bias=False)}
    stem = learn.opt.param_lists[0]
    assert not learn.model.conv1.weight.requires_grad and learn.model.bn1.weight.requires_grad
    assert all(p.requires_grad == (id(p) in norms) for p in stem)
    assert trainable_groups(learn) == [False]*4 + [True]*2


def test_lr_slice_spreads_over_all_groups():
    learn = bloodcell_learner(synth_dls(), 'vit_tiny_2blocks', img_size=32)
    learn.create_opt()
    learn.opt.set_hyper('lr', slice(1e-6, 1e-3))
    lrs = [h['lr'] for h in learn.opt.hypers]
    assert len(lrs) == 4 and lrs == sorted(lrs) and len(set(lrs)) == 4
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-3)


# ---------------------------------------------------------------- weight policy

@pytest.mark.parametrize('fn', ['r18.pth', 'r18.safetensors'])
def test_checkpoint_body_loaded_head_reinitialised(r18_ckpt, fn):
    src, d = r18_ckpt
    m = create_model('resnet18', 8, pretrained=d/fn)
    ref = src.state_dict()
    for k, v in m.state_dict().items():
        if k.startswith('fc.'): continue
        assert torch.equal(v, ref[k]), k
    assert m.fc.weight.shape == (8, 512) and m.fc.bias.shape == (8,)
    assert not torch.equal(m.fc.weight, ref['fc.weight'][:8])
    r = m.load_report
    assert r['reinitialised'] == ['fc.weight', 'fc.bias'] and r['missing'] == [] and r['unexpected'] == []
    assert r['loaded'] == len(ref) - 2
    assert m.pretrained_source == str((d/fn).resolve())


def test_matching_head_is_kept(tmp_path):
    m8 = create_model('resnet18', 8)
    torch.save({'model': m8.state_dict()}, tmp_path/'mine.pth')  # fastai-style wrapper
    m = create_model('resnet18', 8, pretrained=tmp_path/'mine.pth')
    assert torch.equal(m.fc.weight, m8.fc.weight) and m.load_report['reinitialised'] == []


def test_fastai_save_roundtrip(tmp_path):
    learn = bloodcell_learner(synth_dls(), 'lenet5', path=tmp_path)
    f = learn.save('lenet', with_opt=False)
    m = create_model('lenet5', 4, pretrained=f)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), learn.model.state_dict().values()))


def test_vit_checkpoint_resampled_to_img_size(tmp_path):
    v224 = create_model('vit_tiny_2blocks', 1000)
    save_file(v224.state_dict(), tmp_path/'vit.safetensors')
    v = create_model('vit_tiny_2blocks', 8, img_size=64, pretrained=tmp_path/'vit.safetensors')
    assert v.pos_embed.shape == (1, 17, 192)
    assert torch.equal(v.blocks[0].attn.qkv.weight, v224.blocks[0].attn.qkv.weight)
    assert v.head.weight.shape == (8, 192)


def test_chopped_takes_a_full_resnet_checkpoint(r18_ckpt):
    src, d = r18_ckpt
    m = create_model('resnet18', 8, chop_last=True, pretrained=d/'r18.pth')
    assert torch.equal(m.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    assert m.fc.in_features == 256 and m.load_report['ignored'] and all(k.startswith('layer4.') for k in m.load_report['ignored'])


def test_garbage_files_give_clear_errors(tmp_path, r18_ckpt):
    assert issubclass(CheckpointError, ModelFileError)
    (tmp_path/'notes.pth').write_text('not a checkpoint')
    (tmp_path/'junk.safetensors').write_bytes(b'\x00\x01garbage')
    torch.save([1, 2, 3], tmp_path/'list.pt')
    for fn in ('notes.pth', 'junk.safetensors', 'list.pt'):
        with pytest.raises(CheckpointError, match=fn.replace('.', r'\.')): create_model('resnet18', 8, pretrained=tmp_path/fn)
    with pytest.raises(ModelFileError, match='nope.pth not found'): create_model('resnet18', 8, pretrained=tmp_path/'nope.pth')


class Payload:
    "Stands for an arbitrary pickled object: unpickling it would run this module's code"


def test_pickles_with_code_are_refused(tmp_path):
    torch.save({'w': torch.zeros(1), 'obj': Payload()}, tmp_path/'evil.pth')
    with pytest.raises(CheckpointError, match='weights_only'): read_state_dict(tmp_path/'evil.pth')


def test_wrong_architecture_is_reported(r18_ckpt):
    _, d = r18_ckpt
    with pytest.raises(CheckpointError, match='missing keys'): create_model('resnet34', 8, pretrained=d/'r18.pth')
    with pytest.raises(CheckpointError, match=r'r18\.pth'): create_model('mobilenetv3_small', 8, pretrained=d/'r18.pth')
    with pytest.raises(CheckpointError, match='other shapes'): create_model('resnet50', 8, pretrained=d/'r18.pth')


def test_non_strict_warns_and_loads_what_matches(r18_ckpt):
    src, d = r18_ckpt
    with pytest.warns(UserWarning, match='missing keys'):
        m = create_model('resnet34', 8, pretrained=d/'r18.pth', strict=False)
    assert torch.equal(m.conv1.weight, src.conv1.weight)
    assert any(k.startswith('layer1.2.') for k in m.load_report['missing'])


def test_pretrained_true_offline_names_model_and_fix(offline_hub):
    with pytest.raises(WeightsUnavailableError) as e: create_model('resnet18', 8, pretrained=True)
    msg = str(e.value)
    assert isinstance(e.value, BloodcellError)                           # the CLI reports it without a traceback, exit status 2
    assert "'resnet18'" in msg and 'huggingface.co/timm/resnet18' in msg
    assert 'offline' in msg and "pretrained='" in msg
    with pytest.raises(WeightsUnavailableError, match='vit_tiny_2blocks'):
        bloodcell_learner(synth_dls(), 'vit_tiny_2blocks', pretrained=True, img_size=32)


def test_pretrained_true_errors_that_are_not_about_the_network():
    with pytest.raises(ValueError, match='no ImageNet weights'): create_model('cnn_scratch', 8, pretrained=True)
    with pytest.raises(ValueError, match='img_size=224'): create_model('mixer_b16_224', 8, pretrained=True, img_size=128)
    with pytest.raises(TypeError): create_model('resnet18', 8, pretrained=True, no_such_arg=1)  # not masked as "offline"


# ---------------------------------------------------------------- normalisation

def test_model_stats():
    assert model_stats('resnet18') == (list(imagenet_stats[0]), list(imagenet_stats[1]))
    assert timm.models.get_pretrained_cfg('vit_tiny_patch16_224').mean == (0.5, 0.5, 0.5)
    assert model_stats('vit_tiny_patch16_224') == ([0.5]*3, [0.5]*3)
    assert model_stats('vit_tiny_patch16_224', pretrained=False) == model_stats('vit_tiny_patch16_224', pretrained=True)
    assert model_stats('cnn_scratch') == model_stats('lenet5') == (list(imagenet_stats[0]), list(imagenet_stats[1]))
    assert model_stats('convnext_tiny')[1] == pytest.approx(imagenet_stats[1])


# ---------------------------------------------------------------- learner

def test_learner_from_checkpoint_is_frozen_and_recorded(tmp_path):
    v224 = create_model('vit_tiny_2blocks', 1000)
    save_file(v224.state_dict(), tmp_path/'vit.safetensors')
    dls = synth_dls(c=3)
    learn = bloodcell_learner(dls, 'vit_tiny_2blocks', pretrained=tmp_path/'vit.safetensors', img_size=32)
    assert learn.model.head.out_features == 3
    assert trainable_groups(learn) == [False, False, False, True]
    assert learn.arch == 'vit_tiny_2blocks' and learn.pretrained_source == str((tmp_path/'vit.safetensors').resolve())
    assert learn.arch_kwargs == dict(n_out=3, img_size=32, chop_last=False)
    rebuilt = create_model(learn.arch, **learn.arch_kwargs)
    rebuilt.load_state_dict(learn.model.state_dict())  # same module


def test_learner_frozen_fit_leaves_body_untouched(tmp_path):
    v = create_model('vit_tiny_2blocks', 1000, img_size=32)
    save_file(v.state_dict(), tmp_path/'v.safetensors')
    learn = bloodcell_learner(synth_dls(), 'vit_tiny_2blocks', pretrained=tmp_path/'v.safetensors', img_size=32)
    w0, h0 = learn.model.blocks[0].attn.qkv.weight.clone(), learn.model.head.weight.clone()
    with learn.no_logging(): learn.fit(1, 1e-2)
    assert torch.equal(learn.model.blocks[0].attn.qkv.weight, w0)
    assert not torch.equal(learn.model.head.weight, h0)


def test_learner_random_init_is_trainable_and_chop_recorded():
    learn = bloodcell_learner(synth_dls(c=5), 'resnet50', chop_last=True, n_out=2)
    assert learn.pretrained_source is None and all(p.requires_grad for p in learn.model.parameters())
    assert learn.model.fc.out_features == 2 and learn.arch_kwargs['chop_last'] is True
    assert count_groups(learn) == 5


def test_learner_needs_n_out():
    dls = synth_dls()
    del dls.c
    with pytest.raises(ValueError, match='n_out'): bloodcell_learner(dls, 'lenet5')
    assert bloodcell_learner(dls, 'lenet5', n_out=3).model.head.out_features == 3


def test_model_and_splitter_pickle():
    "what `learn.export` needs from this module: the model (with its run-record attributes) and the splitter"
    learn = bloodcell_learner(synth_dls(), 'resnet18', chop_last=True)
    m = pickle.loads(pickle.dumps(learn.model))
    assert m.arch_kwargs == learn.arch_kwargs and torch.equal(m.fc.weight, learn.model.fc.weight)
    assert pickle.loads(pickle.dumps(learn.splitter)) is bloodcell_splitter
