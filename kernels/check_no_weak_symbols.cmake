# cmake -DNM=nm -DOBJECTS="a.o|b.o" -P check_no_weak_symbols.cmake: fails if any object defines a weak function
# (nm type W: an inline function the linker keeps one copy of). Weak objects (V, e.g. DW.ref.__gxx_personality_v0
# that unwind tables refer to) hold no instructions and are allowed.
string(REPLACE "|" ";" objects "${OBJECTS}")
list(LENGTH objects count)
if(count EQUAL 0)
  message(FATAL_ERROR "check_no_weak_symbols: no object files given")
endif()
foreach(object IN LISTS objects)
  execute_process(COMMAND "${NM}" -C --defined-only "${object}" OUTPUT_VARIABLE symbols COMMAND_ERROR_IS_FATAL ANY)
  string(REGEX MATCHALL "[^\n]* W [^\n]*" weak "${symbols}")
  if(weak)
    message(FATAL_ERROR "${object} defines weak functions, which the linker may share across instruction sets:\n"
                        "${weak}\nGive them internal linkage (see kernels/microkernel.h).")
  endif()
endforeach()
