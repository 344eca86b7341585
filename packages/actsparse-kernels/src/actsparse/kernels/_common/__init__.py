"""What every kernel of actsparse-kernels shares.

* :mod:`.reference`: the dense computation the ops stand for, the argument
  checks, the autograd formula and :func:`define_op`, which declares an op;
* :mod:`.status`: :class:`KernelStatus` and :class:`KernelUnavailableError`;
* :mod:`.layout`: the input-major weight layout;
* :mod:`.build`: the JIT build of a kernel's C++ sources (:class:`CppExtension`);
* :mod:`.crossover`: the search for the token count up to which a kernel wins;
* :mod:`.linear`: the support check and ``apply`` of kernels for ``nn.Linear``.
"""
