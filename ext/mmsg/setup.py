from setuptools import Extension, setup

setup(ext_modules=[Extension("sipdrill_mmsg", ["sipdrill_mmsg.c"], extra_compile_args=["-O2"])])
