# The two set-up commands of the README; each installs what it needs first.
.PHONY: demo test setup setup-mmdet lock lint smoke

setup:
	bash tools/setup_env.sh

# MMDetection with ALL of mmcv's C++ ops compiled for CPU (about 32 minutes on 2 cores the first
# time; the wheel is cached and later set-ups install it in seconds). The set-up itself compiles
# only the ops of the shipped configs (about 3 minutes).
setup-mmdet: setup
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt .venv/bin/python tools/install_mmdet.py --python .venv/bin/python --ops all

# Refresh the lock (constraints.txt) to the newest versions the registry serves; then make test.
lock:
	bash tools/lock.sh

demo: setup
	.venv/bin/python tools/demo.py

# The Fashion-MNIST checks run on the real dataset: its Debian package is installed when root or
# password-less sudo allows (about a second); otherwise they skip, and the command is printed.
test: setup
	.venv/bin/python tools/install_fashion_mnist.py || echo "[test] Fashion-MNIST is not installed: its checks skip"
	.venv/bin/python -m pytest -q -ra

smoke: setup
	bash tools/pretrain.sh configs/pretrain/imsvd_smoke.yaml

lint: setup
	.venv/bin/python -m flake8 pretrain transfer tools tests benchmarks
	.venv/bin/python -m isort --check-only pretrain transfer tools tests benchmarks
	.venv/bin/python -m black --check -q pretrain transfer tools tests benchmarks
