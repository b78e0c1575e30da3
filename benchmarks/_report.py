"What the benchmark scripts share: rewriting a results page while keeping its hand-written reading."
from pathlib import Path
from bloodcell_fastai.core import atomic_write

NOTES = '## What it shows'

def write_report(path:Path, # the markdown page, e.g. benchmarks/OTHERLAB.md
                 lines:list, # the generated part, one string per line
                ):
    "Write `lines` to `path` atomically, keeping the hand-written section headed `NOTES` of the page already there."
    old = Path(path).read_text() if Path(path).exists() else ''
    keep = old[old.index(NOTES):] if NOTES in old else ''
    atomic_write(path, '\n'.join(lines) + '\n' + ('\n'+keep if keep else ''))
