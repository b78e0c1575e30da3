__version__ = "0.1.0"
# fastai calls `torch.jit.script` at import, which torch >= 2.10 deprecates: a warning about fastai, not about us, that
# would otherwise open every notebook and command's output
import warnings as _w
_w.filterwarnings('ignore', message='.*torch.jit.script.*', category=FutureWarning)
