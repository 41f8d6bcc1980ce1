"""The model floor: the FBCNN network, its registry and initialisation, the training step,
the model zoo (names, downloads, safe loading) and inference. Imports data and utils only."""
import utils  # noqa: F401  (caps OpenCV's decoders before any module here imports cv2)
