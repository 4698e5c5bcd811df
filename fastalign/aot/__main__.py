"""``python -m fastalign.aot``: the gate's command line (:func:`fastalign.aot.cli.main`)."""
import sys

from fastalign.aot import main

sys.exit(main())
