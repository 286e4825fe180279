"""The modules of a pretraining model and what builds them.

* :mod:`pretrain.models.resnet`: the torchvision ResNets (arch and stem names, the network, both
  recognised from a state dict's keys); below ``pretrain.checkpoint``, which validates backbones
  against it;
* :mod:`pretrain.models.backbone`: the backbone (the ResNet with the small-input convolutions);
* :mod:`pretrain.models.projector`: the projector and its output norm;
* :mod:`pretrain.models.build`: :class:`~pretrain.models.build.PretrainModel`, built from a
  recipe or from a checkpoint;
* :mod:`pretrain.models.syncbn`: BatchNorm over the global batch on every device.
"""
