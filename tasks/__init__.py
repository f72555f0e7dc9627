"""ptqflow's stages and the code they run, in layers (each imports only those below it; tests/test_layers.py):

* ``stages``: the Prefect tasks: sample, train, calibrate, convert, validate, and the sweep's, report's and
  release's tasks, each a thin wrapper that reads artifacts from the store and writes results back;
* ``views``: reports for people;
* ``release``: manifests, exports, promotion;
* ``sweep``: the grid and the ranking;
* ``evaluation``: the interpreter, metrics, device figures, the gate;
* ``quantization``: the converter and its methods;
* ``models``: build, train, load, feed;
* ``data``: sources, splits, the calibration draw;
* ``core``: parameters, records, errors, caching.
"""

from ptqflow.tasks.core.installation import check_tensorflow_install

# Before any stage imports TensorFlow: two builds installed over each other fail later, far from the cause.
check_tensorflow_install()
