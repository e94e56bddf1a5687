/* bench: `kbridge bench`, a publish (and fan-out) load generator for kbridged. */
#ifndef KB_BENCH_H
#define KB_BENCH_H

/* Runs `kbridge bench` with its own arguments (argv[0] is the command's name); `address`
 * is the default server address from the global options. Returns the exit status.
 * Main thread only; starts a subscriber thread with --subscribers. */
int bench_main(const char *address, int argc, char **argv);

#endif
