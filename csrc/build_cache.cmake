# A cache of the installed extension modules, so that a second `pip install` of an unchanged
# checkout (the README's test command after its first command) installs what the first built
# instead of compiling it again. scikit-build-core clears CMake's object files whenever pip's
# isolated build environment is new, which is every time, so CMake alone cannot avoid that.
#
# The key is a SHA-256 over every file under csrc/ and cuda/, this CMakeLists.txt and everything
# that shapes the binary: compilers and their versions, flags, build type, the options, Python's
# SOABI, pybind11's and the BLAS's versions, OpenMP. A hit installs the cached file (checked
# against its recorded SHA-256); a miss builds as usual, and the install stores the installed file
# (with its final run-time path) under the key. Only scikit-build-core builds use it (SKBUILD is
# set); RNNFAST_BUILD_CACHE=OFF turns it off. The cache lives in build/cache/ of the checkout.

option(RNNFAST_BUILD_CACHE "Reuse the extension built by an earlier install of the same sources"
       ON)
set(RNNFAST_BUILD_CACHE_DIR "${CMAKE_SOURCE_DIR}/build/cache"
    CACHE PATH "Where the extension cache keeps its files")
set(_rnnfast_cache_kept 3)  # files per module: enough for switching between a few configurations

# Sets <out_key> to the cache key of module <name>: the sources' hash and the strings given
function(rnnfast_cache_key name out_key)
  file(GLOB_RECURSE _files LIST_DIRECTORIES false "${CMAKE_SOURCE_DIR}/csrc/*"
       "${CMAKE_SOURCE_DIR}/cuda/*")
  list(APPEND _files "${CMAKE_SOURCE_DIR}/CMakeLists.txt")
  list(SORT _files)
  set(_all "${name}")
  foreach(_f IN LISTS _files)
    file(SHA256 "${_f}" _h)
    file(RELATIVE_PATH _rel "${CMAKE_SOURCE_DIR}" "${_f}")
    string(APPEND _all "|${_rel}=${_h}")
  endforeach()
  foreach(_s IN LISTS ARGN)
    string(APPEND _all "|${_s}")
  endforeach()
  string(SHA256 _key "${_all}")
  string(SUBSTRING "${_key}" 0 24 _key)
  set(${out_key} "${_key}" PARENT_SCOPE)
endfunction()

# Sets <out_hit> to TRUE, and installs the cached module, when <name> with <key> is cached intact
function(rnnfast_cache_lookup name key out_hit)
  set(${out_hit} FALSE PARENT_SCOPE)
  if(NOT RNNFAST_BUILD_CACHE OR NOT DEFINED SKBUILD)
    return()
  endif()
  set(_file "${RNNFAST_BUILD_CACHE_DIR}/${name}-${key}${PYTHON_MODULE_EXTENSION}")
  if(NOT EXISTS "${_file}" OR NOT EXISTS "${_file}.sha256")
    message(STATUS "rnnfast: ${name}: not in the build cache (key ${key}): compiling")
    return()
  endif()
  file(READ "${_file}.sha256" _want)
  file(SHA256 "${_file}" _got)
  if(NOT _want STREQUAL _got)
    message(STATUS "rnnfast: ${name}: the cached build ${_file} is damaged: compiling")
    file(REMOVE "${_file}" "${_file}.sha256")
    return()
  endif()
  file(TOUCH_NOCREATE "${_file}")  # the newest use is kept longest
  install(FILES "${_file}" DESTINATION rnnfast RENAME "${name}${PYTHON_MODULE_EXTENSION}")
  message(STATUS "rnnfast: ${name}: sources and configuration unchanged since an earlier build "
                 "(key ${key}): installing it from ${RNNFAST_BUILD_CACHE_DIR} "
                 "(-DRNNFAST_BUILD_CACHE=OFF compiles anyway)")
  set(${out_hit} TRUE PARENT_SCOPE)
endfunction()

# After install(TARGETS <name> ...): the installed file goes into the cache under <key>, written
# to a temporary name first so that an interrupted install leaves no partial entry
function(rnnfast_cache_store name key)
  if(NOT RNNFAST_BUILD_CACHE OR NOT DEFINED SKBUILD)
    return()
  endif()
  set(_file "${RNNFAST_BUILD_CACHE_DIR}/${name}-${key}${PYTHON_MODULE_EXTENSION}")
  set(_installed "rnnfast/${name}${PYTHON_MODULE_EXTENSION}")
  install(
    CODE "
    set(_src \"\$ENV{DESTDIR}\${CMAKE_INSTALL_PREFIX}/${_installed}\")
    if(EXISTS \"\${_src}\")
      file(MAKE_DIRECTORY \"${RNNFAST_BUILD_CACHE_DIR}\")
      file(COPY_FILE \"\${_src}\" \"${_file}.tmp\")
      file(SHA256 \"${_file}.tmp\" _h)
      file(WRITE \"${_file}.sha256.tmp\" \"\${_h}\")
      file(RENAME \"${_file}.tmp\" \"${_file}\")
      file(RENAME \"${_file}.sha256.tmp\" \"${_file}.sha256\")
      file(GLOB _entries \"${RNNFAST_BUILD_CACHE_DIR}/${name}-*${PYTHON_MODULE_EXTENSION}\")
      set(_dated)
      foreach(_e IN LISTS _entries)
        file(TIMESTAMP \"\${_e}\" _t \"%Y%m%d%H%M%S\")
        list(APPEND _dated \"\${_t}|\${_e}\")
      endforeach()
      list(SORT _dated ORDER DESCENDING)
      list(LENGTH _dated _n)
      if(_n GREATER ${_rnnfast_cache_kept})
        list(SUBLIST _dated ${_rnnfast_cache_kept} -1 _old)
        foreach(_o IN LISTS _old)
          string(REGEX REPLACE \"^[0-9]+[|]\" \"\" _o \"\${_o}\")
          file(REMOVE \"\${_o}\" \"\${_o}.sha256\")
        endforeach()
      endif()
    endif()
  ")
endfunction()
