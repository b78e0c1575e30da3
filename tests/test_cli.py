"The `bloodcell` command line: hyphenated flags, one-line errors with exit status 2, `--debug`, and what it does not catch."
import pytest
import bloodcell_fastai.cli as cli
from bloodcell_fastai.cli import COMMANDS, command_parser, main
from bloodcell_fastai.core import DataError


def test_help_shows_hyphens_and_underscores_still_parse(capsys):
    p = command_parser(cli.bloodcell_predict, 'bloodcell predict')
    h = p.format_help()
    assert '--top-k' in h and '--top_k' not in h and h.startswith('usage: bloodcell predict')
    for flag in ('--top-k', '--top_k'):
        assert p.parse_args(['run', 'imgs', flag, '5']).top_k == 5
    ih = command_parser(cli.bloodcell_interpret, 'bloodcell interpret').format_help()
    assert '--n-top-losses' in ih and '--top-k' not in ih and '--save-temperature' in ih
    th = command_parser(cli.bloodcell_train, 'bloodcell train').format_help()
    assert '--no-ood' in th and '--weights' in th and '--pretrained' in th
    with pytest.raises(SystemExit) as e: main(['predict', '--help'])
    assert e.value.code == 0 and '--top-k' in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: bloodcell [--debug] COMMAND') and all(f'  {k} ' in out for k in COMMANDS)


def test_ensemble_seed_default():
    assert command_parser(cli.bloodcell_ensemble, 'bloodcell ensemble').parse_args(['a', 'b']).seed == 42


def test_unknown_command_and_bad_flag_exit_2(capsys):
    with pytest.raises(SystemExit) as e: main(['trian'])
    assert e.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(['interpret', 'run', '--top_k', '3'])      # renamed --n-top-losses
    assert e.value.code == 2 and 'unrecognized arguments: --top_k' in capsys.readouterr().err


def test_project_error_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: main(['train', '--arch', 'no_such_arch', '--out', str(tmp_path/'r')])
    assert e.value.code == 2
    cap = capsys.readouterr()
    err = cap.err.splitlines()
    assert len(err) == 1 and err[0].startswith('bloodcell train: error: ') and 'no_such_arch' in err[0], cap.err
    assert 'Traceback' not in cap.err + cap.out and not (tmp_path/'r').exists()   # refused before anything is written


def test_debug_prints_the_traceback_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: main(['train', '--debug', '--arch', 'no_such_arch', '--out', str(tmp_path/'r')])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('Traceback') and 'ConfigError' in err
    assert err.splitlines()[-1].startswith('bloodcell train: error: ') and 'no_such_arch' in err.splitlines()[-1]


def test_other_exceptions_propagate(monkeypatch, capsys):
    def boom(path:str): raise RuntimeError('a bug, not bad input')
    monkeypatch.setitem(COMMANDS, 'audit', boom)
    with pytest.raises(RuntimeError, match='a bug, not bad input'): main(['audit', 'x'])
    def bad(path:str): raise DataError(file=path, problem='is not there', fix='give another')
    monkeypatch.setitem(COMMANDS, 'audit', bad)
    with pytest.raises(SystemExit) as e: main(['audit', 'x'])
    assert e.value.code == 2 and capsys.readouterr().err == 'bloodcell audit: error: x is not there: give another\n'


def _train_pretrained_offline(tmp_path, capsys):
    "`bloodcell train --pretrained` on a machine without the hub: a tiny sample, so it fails before any training."
    with pytest.raises(SystemExit) as e:
        main(['train', '--pretrained', '--arch', 'resnet18', '--out', str(tmp_path/'r'), '--sample', '2', '--epochs', '1', '--size', '32',
              '--bs', '4', '--lr', '1e-3', '--precision', 'fp32'])
    cap = capsys.readouterr()
    return e.value.code, cap.err


def test_train_pretrained_offline_exits_2_naming_the_weights(offline_hub, data_root, tmp_path, capsys):
    code, err = _train_pretrained_offline(tmp_path, capsys)
    assert code == 2 and 'Traceback' not in err
    assert err.startswith("bloodcell train: error: Could not get the pretrained weights of 'resnet18'"), err
    assert 'huggingface.co/timm/resnet18' in err and 'offline' in err
    assert not (tmp_path/'r'/'model.safetensors').exists()


def test_train_pretrained_offline_error_is_one_line(offline_hub, data_root, tmp_path, capsys):
    code, err = _train_pretrained_offline(tmp_path, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err


def test_predict_without_a_run_uses_the_shipped_model(pbc_sample, tmp_path):
    "A subprocess, as a user types it: `bloodcell predict FOLDER` on a machine with no run of its own."
    import shutil, subprocess, sys
    import pandas as pd
    inbox = tmp_path/'inbox'; inbox.mkdir()
    for c in ('eosinophil', 'platelet'): shutil.copy(pbc_sample[c][0], inbox)
    r = subprocess.run([sys.executable, '-c', 'from bloodcell_fastai.cli import main; main()', 'predict', str(inbox),
                        '--csv', str(tmp_path/'p.csv')], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path/'p.csv')
    assert len(df) == 2 and set(df.status) <= {'ok', 'refer to expert', 'unlike the training data'} and df.label.notna().all()
    r = subprocess.run([sys.executable, '-c', 'from bloodcell_fastai.cli import main; main()', 'models', str(tmp_path/'none')],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and 'shipped' in r.stdout and 'pbc_lite1' in r.stdout and 'efficientnet_lite1' in r.stdout, r.stdout + r.stderr
