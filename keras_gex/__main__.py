import sys

from keras_gex.app.cli import main

sys.exit(main())
