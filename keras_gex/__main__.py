import sys

from keras_gex.cli import main

sys.exit(main())
