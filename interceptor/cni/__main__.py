import sys

from interceptor.cni.plugin import main

sys.exit(main())
