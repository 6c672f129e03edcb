"""The built-in default's data: text and image corpora and the task suites built from them, all from
data installed by package managers (Debian packages, the scikit-learn wheel), nothing downloaded."""
