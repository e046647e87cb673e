"""rayvid: run tf.keras models over large video archives with Ray Data.

Importing the package is light: TensorFlow and decord load only inside the stages that
use them (decode.Decoder, infer.Predictor, models.load).
"""

__version__ = "0.1.0"
