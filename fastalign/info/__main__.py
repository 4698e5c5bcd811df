"""``python -m fastalign.info``: print what this install carries and what runs here."""
import sys

from fastalign.info import main

sys.exit(main())
