import sys

from mpfleet.demo.fleet import main

sys.exit(main())
