"""Check the docs where Quarto is not available (CI): `make docs-check`.

1. Process the notebooks exactly as `nbdev_docs` does before calling Quarto (nbdev's `proc_nbs`: directives, hidden
   cells, `show_doc` for every exported symbol) into `_proc/`.
2. Render every processed notebook to HTML with nbconvert (`_proc/_html/`), so a notebook that cannot be rendered
   fails here.
3. Fail on broken internal links (markdown links to notebooks, pages, files or images that do not exist, in the
   notebooks and in README.md, which the landing page includes), on sidebar entries without a notebook, on
   notebooks missing from the sidebar, and on exported functions or classes without a docstring or with
   undocumented parameters.

nbdev's own `nbdev_proc_nbs` is not used because, without Quarto, it tries to install Quarto with sudo and then
runs `pip install -e .` with whatever pip is first on the PATH.
"""
import importlib, inspect, re, sys
from pathlib import Path

LINK_RE = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
INCLUDE_RE = re.compile(r'\{\{<\s*include\s+(\S+)\s*>\}\}')
EXTERNAL = ('http://', 'https://', 'mailto:', 'ftp://', 'data:')


def page_name(nb: Path) -> str:
    "The HTML page nbdev/Quarto make of a notebook: `02_data.ipynb` -> `data.html`, `index.ipynb` -> `index.html`."
    return re.sub(r'^\d+[a-z]?_', '', nb.stem) + '.html'


def check_links(text: str, base: Path, nbs: Path, where: str, pages: set) -> list:
    "Broken internal link targets in markdown `text` whose relative links resolve from `base`."
    errs = []
    for m in LINK_RE.finditer(text):
        t = m.group(1)
        if t.startswith(EXTERNAL) or t.startswith('#'): continue
        t = t.split('#')[0].split('?')[0]
        if not t: continue
        p = (base/t).resolve()
        if t.endswith('.html') and (p.name in pages): continue
        if not p.exists(): errs.append(f"{where}: broken link '{m.group(1)}'")
    return errs


def check_symbols(lib: str) -> list:
    "Exported functions/classes without a docstring, or with parameters that have no docments comment."
    from fastcore.docments import docments
    idx = importlib.import_module(f'{lib}._modidx').d['syms']
    errs = []
    for mod, syms in idx.items():
        m = importlib.import_module(mod)
        for name in getattr(m, '__all__', []):
            o = getattr(m, name, None)
            if not (inspect.isfunction(o) or inspect.isclass(o)) or getattr(o, '__module__', mod) != mod: continue
            if not (o.__doc__ or '').strip(): errs.append(f"{mod}.{name}: no docstring"); continue
            if inspect.isclass(o) and '__init__' not in vars(o): continue     # inherited: documented upstream
            f = o.__init__ if inspect.isclass(o) else o
            try: docs = docments(f, full=False, returns=False)
            except Exception: continue
            sig = inspect.signature(f)
            undoc = [p for p, v in sig.parameters.items() if p not in ('self', 'cls') and
                     v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and not docs.get(p)]
            if undoc: errs.append(f"{mod}.{name}: parameter(s) without a docments comment: {', '.join(undoc)}")
    return errs


def main():
    from nbdev.config import get_config
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.processors import FilterDefaults
    from nbdev.serve_drv import exec_nb
    import nbdev.doclinks, shutil, os
    from nbconvert import HTMLExporter
    import nbformat, yaml

    cfg = get_config()
    nbs, root = cfg.nbs_path, cfg.config_path
    errs = []
    refresh_quarto_yml()                                                  # nbs/nbdev.yml from settings.ini
    nbdev.doclinks._build_modidx()
    cache = root/'_proc'
    shutil.rmtree(cache, ignore_errors=True); cache.mkdir()
    for f in nbs.iterdir():                                               # what nbdev's proc_nbs copies as is
        if f.is_file() and f.suffix != '.ipynb' and not f.name.startswith('.'): shutil.copy(f, cache/f.name)
    notebooks = sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    os.environ['IN_TEST'] = '1'
    for nb in notebooks:                                                  # nbdev's processing, one notebook at a time
        try: exec_nb(nb, cache/nb.name, FilterDefaults)
        except Exception as e:
            cause = e.__cause__ or e
            errs.append(f"{nb.name}: nbdev processing failed: {str(e).splitlines()[0]} -> {type(cause).__name__}: {cause}")
    pages = {page_name(p) for p in notebooks}

    html_dir = cache/'_html'; html_dir.mkdir(exist_ok=True)
    exporter = HTMLExporter()
    for nb in notebooks:
        proc = cache/nb.name
        if not proc.exists(): errs.append(f"{nb.name}: not processed by nbdev"); continue
        try:
            body, _ = exporter.from_notebook_node(nbformat.read(proc, as_version=4))
            (html_dir/page_name(nb)).write_text(body)
        except Exception as e: errs.append(f"{nb.name}: nbconvert HTML render failed: {type(e).__name__}: {e}")
        for i, c in enumerate(nbformat.read(nb, as_version=4).cells):
            if c.cell_type != 'markdown': continue
            errs += check_links(c.source, nbs, nbs, f"{nb.name} cell {i}", pages)
            for inc in INCLUDE_RE.findall(c.source):
                f = (nbs/inc).resolve()
                if not f.exists(): errs.append(f"{nb.name} cell {i}: include '{inc}' not found")
                else: errs += check_links(f.read_text(), nbs, nbs, f"{inc} (included by {nb.name})", pages)

    side = yaml.safe_load((nbs/'sidebar.yml').read_text())
    def entries(items):
        for it in items:
            if isinstance(it, str): yield it
            elif isinstance(it, dict): yield from entries(it.get('contents', []))
    listed = set(entries(side['website']['sidebar']['contents']))
    errs += [f"sidebar.yml: '{e}' does not exist" for e in sorted(listed) if not (nbs/e).exists()]
    errs += [f"sidebar.yml: {p.name} is missing from the sidebar" for p in notebooks if p.name not in listed]
    errs += check_symbols(cfg.lib_name)

    print(f"docs check: {len(notebooks)} notebooks processed into {cache} and rendered to {html_dir}")
    if errs:
        print(f"{len(errs)} problem(s):"); print('\n'.join(f"  - {e}" for e in errs))
        sys.exit(1)
    print("docs check passed: no broken links, sidebar complete, every exported symbol documented")


if __name__ == '__main__': main()
