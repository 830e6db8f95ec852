"""`python -m dmd2lab`: the command line, as torchrun and accelerate launch start it (docs/scaling.md)."""
from .cli import main

raise SystemExit(main())
