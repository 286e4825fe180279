"""The images of every pipeline: decoding, labelled datasets, the two pretraining views and their
loader, the demo's Fashion-MNIST.

* :mod:`pretrain.data.images`: the one image decoder and the data errors;
* :mod:`pretrain.data.datasets`: labelled image datasets (ImageFolder trees, ``path label``
  lists, synthetic images) shared by pretraining, probes and evaluations;
* :mod:`pretrain.data.transforms`, :mod:`pretrain.data.fast_augment`: the two asymmetric views
  (reference PIL pipeline, evaluation transforms; the fast batched pipeline);
* :mod:`pretrain.data.loader`: the two-view dataset, its epoch sampler and loader;
* :mod:`pretrain.data.fashion_mnist`: the demo's dataset.
"""
