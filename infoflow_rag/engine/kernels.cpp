// One extension for the compiled kernels; each releases the GIL while it runs.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_row_attention", &sparse_row_attention, py::call_guard<py::gil_scoped_release>());
  m.def("few_row_attention", &few_row_attention, py::call_guard<py::gil_scoped_release>());
  m.def("few_row_linear", &few_row_linear, py::call_guard<py::gil_scoped_release>());
  m.def("rotate_keys_into", &rotate_keys_into, py::call_guard<py::gil_scoped_release>());
}
