"""Check that every import in the library points down the layers, and that no function imports a sibling module.

    python tools/check_layers.py            # exit 1, one line per offence, when the layering is broken

The layer order has one home: the notebook names. `nbs/NN[x]_name.ipynb` with `#| default_exp module` puts `module`
in layer NN (`02c_cams.ipynb` -> `cams` in layer 2). A module may import only modules of a lower layer, at module
level; an import of a project module inside a function (the usual way to dodge a cycle) is refused too.
"""
import ast, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = 'bloodcell_fastai'


def layers(nbs: Path = ROOT/'nbs') -> dict:
    "module -> layer, read from the notebooks' names and their `default_exp`."
    out = {}
    for fn in sorted(nbs.glob('[0-9]*.ipynb')):
        m = re.match(r'(\d+)', fn.name)
        for c in json.loads(fn.read_text())['cells']:
            src = ''.join(c['source'])
            d = re.search(r'^#\|\s*default_exp\s+(\S+)', src, re.M)
            if c['cell_type'] == 'code' and d: out[d.group(1)] = int(m.group(1)); break
    return out


def project_imports(tree: ast.AST, module: str):
    "`(lineno, imported module, inside a function?)` for every import of a project module."
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    inner = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
    for n in ast.walk(tree):
        names = []
        if isinstance(n, ast.ImportFrom):
            if n.level: names = [(n.module or '').split('.')[0] or [a.name for a in n.names][0]]
            elif n.module and n.module.split('.')[0] == PKG:
                rest = n.module.split('.')[1:]
                names = rest[:1] if rest else [a.name for a in n.names]
        elif isinstance(n, ast.Import):
            names = [a.name.split('.')[1] for a in n.names if a.name.startswith(PKG + '.')]
        for name in names:
            if name != module: yield n.lineno, name, id(n) in inner


def check(lib: Path = ROOT/PKG) -> list:
    "One message per import that breaks the layering."
    lay, errs = layers(), []
    for fn in sorted(lib.glob('*.py')):
        mod = fn.stem
        if mod.startswith('_'): continue
        if mod not in lay: errs.append(f"{fn.name}: no notebook in nbs/ exports it (cannot tell its layer)"); continue
        for line, other, in_func in project_imports(ast.parse(fn.read_text()), mod):
            where = f"{fn.relative_to(ROOT)}:{line}"
            if other not in lay: errs.append(f"{where}: imports {other}, which no notebook exports"); continue
            if in_func: errs.append(f"{where}: imports {other} inside a function; import it at the top (if it is below) or pass a function in")
            if lay[other] >= lay[mod]:
                errs.append(f"{where}: {mod} (layer {lay[mod]}) imports {other} (layer {lay[other]}); imports must point to a lower layer")
    return errs


if __name__ == '__main__':
    errs = check()
    for e in errs: print(f"FAIL: {e}")
    if errs: sys.exit(1)
    lay = layers()
    print(f"layers OK: {len(lay)} modules, " + '; '.join(f"{k}: {', '.join(m for m in lay if lay[m] == k)}" for k in sorted(set(lay.values()))))
