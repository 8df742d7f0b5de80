// The floor (baseline.c, its main renamed floor_main) under smtp521's own
// seccomp filter, installed by smtp521's own confine() before the first
// read, as smtp521 does: what the filter costs a process, apart from the
// rest of smtp521.
#define SMTP521_NO_MAIN
#include "../../smtp521.cpp"

extern "C" int floor_main(void);

int main() { return smtp521::confine() ? floor_main() : 111; }
