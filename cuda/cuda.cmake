# The CUDA module rnnfast._cuda, a separate extension so that the package imports and works
# without it. Included by the top-level CMakeLists.txt unless RNNFAST_CUDA=OFF.
#   AUTO: built where a CUDA compiler is found; where none is, says so and goes on.
#   ON:   a CUDA compiler is required.
# cuBLAS is loaded at run time (dlopen, cuda/cublas_shim.cu): the build needs no cuBLAS headers or
# library. Where cublas_api.h is found (the CUDA toolkit, the nvidia-cublas wheel in the build's
# Python, or RNNFAST_CUBLAS_INCLUDE_DIR) the shim's declarations are checked against it.

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(RNNFAST_CUDA STREQUAL "ON")
    message(FATAL_ERROR "rnnfast: RNNFAST_CUDA=ON but no CUDA compiler was found "
                        "(set CUDACXX or put nvcc on PATH)")
  endif()
  message(STATUS "rnnfast: no CUDA compiler found; building without the CUDA module "
                 "(RNNFAST_CUDA=AUTO)")
  return()
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES ${RNNFAST_CUDA_ARCHITECTURES})
endif()
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# cublas_api.h, only to check the shim's declarations
set(_rnnfast_cublas_hints ${CUDAToolkit_INCLUDE_DIRS})
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import importlib.util as u, os; s = u.find_spec('nvidia'); print(';'.join(os.path.join(p, 'cu13', 'include') for p in (s.submodule_search_locations if s else [])))"
  OUTPUT_VARIABLE _rnnfast_wheel_include OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
list(APPEND _rnnfast_cublas_hints ${_rnnfast_wheel_include})
find_path(RNNFAST_CUBLAS_INCLUDE_DIR cublas_api.h HINTS ${_rnnfast_cublas_hints} NO_DEFAULT_PATH)

if(RNNFAST_CUBLAS_INCLUDE_DIR)
  set(_rnnfast_cublas_checked 1)
else()
  set(_rnnfast_cublas_checked 0)
endif()
# the build cache of the top-level CMakeLists.txt (csrc/build_cache.cmake), as for _C
rnnfast_cache_key(
  _cuda _rnnfast_cuda_key
  "${CMAKE_CUDA_COMPILER}" "${CMAKE_CUDA_COMPILER_VERSION}" "${CMAKE_CUDA_ARCHITECTURES}"
  "${CMAKE_CUDA_FLAGS}" "${CMAKE_CUDA_FLAGS_RELEASE}" "${CMAKE_CXX_COMPILER}"
  "${CMAKE_CXX_COMPILER_VERSION}" "${CMAKE_BUILD_TYPE}" "${CMAKE_CXX_FLAGS}"
  "${CMAKE_CXX_FLAGS_RELEASE}" "${CMAKE_SHARED_LINKER_FLAGS}" "${CMAKE_MODULE_LINKER_FLAGS}"
  "${Python_SOABI}" "${Python_VERSION}" "${pybind11_VERSION}" "${_rnnfast_cublas_checked}"
  "${SKBUILD_PROJECT_VERSION}")
rnnfast_cache_lookup(_cuda "${_rnnfast_cuda_key}" _rnnfast_cuda_cached)
if(_rnnfast_cuda_cached)
  return()
endif()

set(_rnnfast_cuda_sources
    ${CMAKE_CURRENT_LIST_DIR}/bindings.cpp
    ${CMAKE_CURRENT_LIST_DIR}/cublas_shim.cu
    ${CMAKE_CURRENT_LIST_DIR}/dispatch.cu
    ${CMAKE_CURRENT_LIST_DIR}/persistent_forward.cu
    ${CMAKE_CURRENT_LIST_DIR}/persistent_backward.cu)
pybind11_add_module(_cuda MODULE ${_rnnfast_cuda_sources})
target_include_directories(_cuda PRIVATE ${CMAKE_CURRENT_LIST_DIR}/../csrc ${CMAKE_CURRENT_LIST_DIR})
# cudart is linked statically (CMake's default) and cuBLAS is dlopened: no run-time path needed
set_target_properties(_cuda PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}"
                                       CUDA_RUNTIME_LIBRARY Static)
target_link_libraries(_cuda PRIVATE ${CMAKE_DL_LIBS})
# cell.h's constexpr gate_count() is a host function; device code evaluates it at compile time
target_compile_options(_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -Xcompiler=-Wall>
                                     $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>)
if(RNNFAST_CUBLAS_INCLUDE_DIR)
  # only the shim includes it, and only to check its declarations
  set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cublas_shim.cu
                              PROPERTIES INCLUDE_DIRECTORIES "${RNNFAST_CUBLAS_INCLUDE_DIR}"
                                         COMPILE_DEFINITIONS RNNFAST_HAVE_CUBLAS_H=1)
endif()
target_compile_definitions(
  _cuda PRIVATE RNNFAST_CUDA_ARCHS="${CMAKE_CUDA_ARCHITECTURES}"
                RNNFAST_CUDA_COMPILER_VERSION="${CMAKE_CUDA_COMPILER_VERSION}"
                RNNFAST_CUBLAS_HEADER_CHECKED=${_rnnfast_cublas_checked})
install(TARGETS _cuda LIBRARY DESTINATION rnnfast)
rnnfast_cache_store(_cuda "${_rnnfast_cuda_key}")

if(RNNFAST_CUBLAS_INCLUDE_DIR)
  set(_rnnfast_cublas_note "declarations checked against ${RNNFAST_CUBLAS_INCLUDE_DIR}")
else()
  set(_rnnfast_cublas_note "no cublas_api.h found to check the declarations against")
endif()
message(STATUS "rnnfast: building the CUDA module with nvcc ${CMAKE_CUDA_COMPILER_VERSION} for "
               "architectures ${CMAKE_CUDA_ARCHITECTURES}; cuBLAS loaded at run time "
               "(${_rnnfast_cublas_note})")
