"""The data floor: the JPEG protocol (one module for training and testing), the training
datasets, and FBCNN-D's dominant-QF estimator. Imports utils only."""
import utils  # noqa: F401  (caps OpenCV's decoders before any module here imports cv2)
