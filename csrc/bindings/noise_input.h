// The call's dropout and zoneout from Python, for both extension modules (_C and _cuda).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "rnnfast/cell.h"
#include "rnnfast/noise.h"

namespace rnnfast::bindings {

namespace py = pybind11;

// The call's dropout and zoneout: None, or (seed, stream, candidate p, its threshold, zoneout p,
// its threshold, variational p, its threshold) as rnnfast/_validate.py builds it
inline rnnfast::Noise noise_input(CellKind cell, const py::object& obj, const Dims& d,
                                  bool expectation) {
  rnnfast::Noise z;
  z.expectation = expectation;
  if (obj.is_none()) return z;
  const auto t = obj.cast<py::tuple>();
  if (t.size() != 8) throw py::value_error("noise must be an 8-tuple (see rnnfast/_validate.py)");
  z.seed = t[0].cast<uint64_t>();
  z.stream = t[1].cast<uint32_t>();
  z.candidate = t[2].cast<double>();
  z.candidate_threshold = t[3].cast<uint32_t>();
  z.zoneout = t[4].cast<double>();
  z.zoneout_threshold = t[5].cast<uint32_t>();
  z.variational = t[6].cast<double>();
  z.variational_threshold = t[7].cast<uint32_t>();
  if (z.stream >= (1u << 28)) throw py::value_error("the noise stream must be below 2**28");
  for (double p : {z.candidate, z.zoneout, z.variational})
    if (!(p >= 0 && p < 1))
      throw py::value_error("dropout and zoneout probabilities must be in [0, 1), got " +
                            std::to_string(p));
  const rnnfast::CellInfo& info = rnnfast::cell_info(cell);
  if (z.candidate > 0 && !info.has_candidate())
    throw py::value_error(std::string("recurrent dropout on the candidate needs a cell with one ") +
                          "(LSTM g, GRU n), not " + info.name);
  if ((z.zoneout > 0 || z.variational > 0) && d.P)
    throw py::value_error("zoneout and variational dropout are not supported with a projection");
  return z;
}

}  // namespace rnnfast::bindings
