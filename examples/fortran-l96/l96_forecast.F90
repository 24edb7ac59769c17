! A Fortran Lorenz-96 forecast that calls the mecs service at every step.
!
!   l96_forecast url=http://127.0.0.1:8000 model=l96 members=20 steps=500 out=traj.nc
!
! Each step is the coupled step of mecs (correction/forecast.py):
!
!   c   = service correction of x_n      (one request for all members of this process)
!   x_{n+1} = RK4(x_n) + dt * c
!
! States are float64 inside; they cross to the service as float32 (transport=fp32,
! the default) or float64 (transport=fp64). Built with MPI (l96_forecast_mpi), each
! rank owns a contiguous block of the members, opens its own connection and calls
! concurrently with the other ranks; rank 0 gathers the trajectory and writes it.
!
! Arguments (name=value): url, model, members (1), steps (500), dt (0.01), F (10),
! K (36), init (a file of members*K little-endian float64, member after member;
! default: F plus a small perturbation per member), out (trajectory.nc),
! output_every (1), policy (raise|zero|last), version, timeout, retries, cooldown,
! failure_threshold, follow_latest (1: do not pin the version found at open; follow
! the served default across hot reloads), step_delay (seconds to sleep per step, for tests), progress
! (1: print "step N" after each step), group (l96-forecast: the timestep group the
! ranks declare, group_size = the number of ranks, so the service batches a step's
! calls the moment the last rank's arrives; give concurrent runs different names).
!
! Output: a netCDF classic file with X(time, member, k), step(time), time(time) and
! version(time) (the version that answered that step, -1 if any member's step was
! degraded, 0 at the initial time), and attributes with the run's settings and its
! degraded-step count. Exit status 0, 2 for bad arguments or a failed open, 1 when
! a step fails under policy=raise.
program l96_forecast
  use, intrinsic :: iso_fortran_env, only: real32, real64, error_unit, output_unit
  use, intrinsic :: iso_c_binding, only: c_int, c_double, c_long_long
  use mecs_client
  use l96_model, only: l96_rk4
  use netcdf_classic
#ifdef MECS_MPI
  use mpi
#endif
  implicit none

  interface
     integer(c_int) function c_usleep(us) bind(C, name="usleep")
       import :: c_int
       integer(c_int), value :: us
     end function c_usleep
  end interface

  character(len=512) :: url = "http://127.0.0.1:8000", model = "l96", init = "", &
       out = "trajectory.nc", policy = "raise", transport = "fp32", arg, &
       group = "l96-forecast"
  integer :: members = 1, steps = 500, K = 36, output_every = 1, version = 0, retries = 2, &
       failure_threshold = 3, progress = 0, follow_latest = 0
  real(real64) :: dt = 0.01_real64, forcing = 10.0_real64, timeout = 5.0_real64, &
       cooldown = 2.0_real64, step_delay = 0.0_real64
  type(mecs_handle) :: h
  real(real64), allocatable :: x(:, :), c(:, :), traj(:, :, :), full(:, :, :), times(:)
  real(real32), allocatable :: x4(:, :), c4(:, :)
  integer, allocatable :: versions(:), kept(:), all_versions(:)
  integer :: i, n, status, nout, iout, lo, hi, nloc, rank, nranks, ios, step_version
  integer(c_long_long) :: degraded, total_degraded
  integer :: ierr
#ifdef MECS_MPI
  integer, allocatable :: counts(:), displs(:)
  call mpi_init(ierr)
  call mpi_comm_rank(MPI_COMM_WORLD, rank, ierr)
  call mpi_comm_size(MPI_COMM_WORLD, nranks, ierr)
#else
  rank = 0
  nranks = 1
#endif
  ierr = 0

  do i = 1, command_argument_count()
     call get_command_argument(i, arg)
     call parse_argument(trim(arg))
  end do
  if (members < nranks .or. steps < 1 .or. K < 4 .or. output_every < 1) &
       call usage("need members >= ranks, steps >= 1, K >= 4, output_every >= 1")
  if (policy /= "raise" .and. policy /= "zero" .and. policy /= "last") &
       call usage("policy must be raise, zero or last, not '" // trim(policy) // "'")
  if (transport /= "fp32" .and. transport /= "fp64") &
       call usage("transport must be fp32 or fp64, not '" // trim(transport) // "'")

  ! this rank's members: a contiguous block, the remainder spread over the first ranks
  nloc = members / nranks + merge(1, 0, rank < mod(members, nranks))
  lo = rank * (members / nranks) + min(rank, mod(members, nranks)) + 1
  hi = lo + nloc - 1

  allocate(full(K, members, 1))
  call initial_states(full(:, :, 1))
  x = full(:, lo:hi, 1)
  allocate(c(K, nloc), x4(K, nloc), c4(K, nloc))
  nout = steps / output_every + 1
  if (mod(steps, output_every) /= 0) nout = nout + 1
  allocate(traj(K, nloc, nout), versions(nout), kept(nout), times(nout))
  traj(:, :, 1) = x
  versions(1) = 0
  kept(1) = 0

  if (version > 0) then
     call mecs_open(h, trim(url), trim(model), status, policy=trim(policy), version=version, &
          timeout=timeout, retries=retries, cooldown=cooldown, &
          failure_threshold=failure_threshold, state_shape=[K], &
          dtype=merge(MECS_FP32, MECS_FP64, transport == "fp32"), &
          group=trim(group), group_size=nranks)
  else
     call mecs_open(h, trim(url), trim(model), status, policy=trim(policy), timeout=timeout, &
          follow_latest=follow_latest /= 0, retries=retries, cooldown=cooldown, failure_threshold=failure_threshold, &
          state_shape=[K], dtype=merge(MECS_FP32, MECS_FP64, transport == "fp32"), &
          group=trim(group), group_size=nranks)
  end if
  if (status /= MECS_OK) then
     write(error_unit, '(a,i0,a)') "l96_forecast: rank ", rank, ": cannot open the model: " // &
          mecs_status_name(status) // ": " // mecs_error_message(h)
     call mecs_close(h)
     call finish(2)
  end if

  iout = 1
  do n = 1, steps
     if (transport == "fp32") then
        x4 = real(x, real32)
        call mecs_correct(h, x4, c4, status, dt=real(dt, c_double))
        c = real(c4, real64)
     else
        call mecs_correct(h, x, c, status, dt=real(dt, c_double))
     end if
     if (status < 0) then
        write(error_unit, '(a,i0,a,i0,a)') "l96_forecast: rank ", rank, ": step ", n, &
             " failed: " // mecs_status_name(status) // ": " // mecs_error_message(h)
        call mecs_close(h)
        call finish(1)
     end if
     step_version = merge(-1, mecs_last_version(h), status == MECS_DEGRADED)
     call l96_rk4(x, forcing, dt)
     x = x + dt * c
     if (mod(n, output_every) == 0 .or. n == steps) then
        iout = iout + 1
        traj(:, :, iout) = x
        versions(iout) = step_version
        kept(iout) = n
     end if
     if (progress /= 0) then
        write(output_unit, '(a,i0,a,i0)') "step ", n, " version ", step_version
        flush(output_unit)
     end if
     if (step_delay > 0) ios = c_usleep(int(step_delay * 1e6, c_int))
  end do
  degraded = mecs_degraded_steps(h)
  call mecs_close(h)
  times = kept * dt

  ! gather the members of every rank into full(K, members, nout) on rank 0
  deallocate(full)
  allocate(full(K, members, nout), all_versions(nout))
#ifdef MECS_MPI
  allocate(counts(nranks), displs(nranks))
  call mpi_gather(nloc * K, 1, MPI_INTEGER, counts, 1, MPI_INTEGER, 0, MPI_COMM_WORLD, ierr)
  if (rank == 0) then
     displs(1) = 0
     do i = 2, nranks
        displs(i) = displs(i - 1) + counts(i - 1)
     end do
  end if
  do i = 1, nout
     call mpi_gatherv(traj(:, :, i), nloc * K, MPI_DOUBLE_PRECISION, full(:, :, i), counts, &
          displs, MPI_DOUBLE_PRECISION, 0, MPI_COMM_WORLD, ierr)
  end do
  call mpi_reduce(versions, all_versions, nout, MPI_INTEGER, MPI_MIN, 0, MPI_COMM_WORLD, ierr)
  call mpi_reduce(degraded, total_degraded, 1, MPI_INTEGER8, MPI_SUM, 0, MPI_COMM_WORLD, ierr)
#else
  full = traj
  all_versions = versions
  total_degraded = degraded
#endif
  if (rank == 0) call write_trajectory()
  call finish(0)

contains

  subroutine parse_argument(a)
    character(len=*), intent(in) :: a
    integer :: eq
    character(len=:), allocatable :: name, value
    eq = index(a, "=")
    if (eq < 2) call usage("arguments are name=value, got '" // a // "'")
    name = a(:eq - 1)
    value = a(eq + 1:)
    ios = 0
    select case (name)
    case ("url"); url = value
    case ("model"); model = value
    case ("init"); init = value
    case ("out"); out = value
    case ("policy"); policy = value
    case ("transport"); transport = value
    case ("group"); group = value
    case ("members"); read(value, *, iostat=ios) members
    case ("steps"); read(value, *, iostat=ios) steps
    case ("K"); read(value, *, iostat=ios) K
    case ("output_every"); read(value, *, iostat=ios) output_every
    case ("version"); read(value, *, iostat=ios) version
    case ("retries"); read(value, *, iostat=ios) retries
    case ("failure_threshold"); read(value, *, iostat=ios) failure_threshold
    case ("progress"); read(value, *, iostat=ios) progress
    case ("follow_latest"); read(value, *, iostat=ios) follow_latest
    case ("dt"); read(value, *, iostat=ios) dt
    case ("F"); read(value, *, iostat=ios) forcing
    case ("timeout"); read(value, *, iostat=ios) timeout
    case ("cooldown"); read(value, *, iostat=ios) cooldown
    case ("step_delay"); read(value, *, iostat=ios) step_delay
    case default; call usage("unknown argument '" // name // "'")
    end select
    if (ios /= 0) call usage("argument " // name // ": '" // value // "' is not a number")
  end subroutine parse_argument

  subroutine initial_states(x0)
    real(real64), intent(out) :: x0(:, :)
    integer :: m, kk, unit_, io
    if (len_trim(init) > 0) then
       open(newunit=unit_, file=trim(init), access="stream", form="unformatted", &
            status="old", action="read", iostat=io)
       if (io /= 0) call usage("init: cannot open '" // trim(init) // "'")
       read(unit_, iostat=io) x0
       close(unit_)
       if (io /= 0) call usage("init: '" // trim(init) // "' holds fewer than members*K float64")
    else
       do m = 1, size(x0, 2)
          do kk = 1, size(x0, 1)
             x0(kk, m) = forcing + merge(0.01_real64 * m, 0.0_real64, kk == 1) &
                  + 0.1_real64 * sin(0.5_real64 * kk + m)
          end do
       end do
    end if
  end subroutine initial_states

  subroutine write_trajectory()
    type(nc_file), save :: nc  ! large (attribute texts): static, not on the stack
    integer :: d_time, d_member, d_k, v_step, v_time, v_version, v_x
    call nc_create(nc, trim(out))
    d_time = nc_dim(nc, "time", nout)
    d_member = nc_dim(nc, "member", members)
    d_k = nc_dim(nc, "k", K)
    call nc_text_att(nc, "title", "Lorenz-96 forecast of the Fortran host, corrected by mecs")
    call nc_text_att(nc, "host", "fortran-l96")
    call nc_text_att(nc, "service", trim(url))
    call nc_text_att(nc, "model", trim(model))
    call nc_text_att(nc, "policy", trim(policy))
    call nc_text_att(nc, "transport", trim(transport))
    call nc_int_att(nc, "degraded_steps", int(total_degraded))
    call nc_int_att(nc, "ranks", nranks)
    call nc_int_att(nc, "steps", steps)
    call nc_real_att(nc, "dt", dt)
    call nc_real_att(nc, "F", forcing)
    v_step = nc_var(nc, "step", "int", [d_time])
    v_time = nc_var(nc, "time", "double", [d_time])
    call nc_var_text_att(nc, v_time, "units", "model time unit")
    v_version = nc_var(nc, "version", "int", [d_time])
    call nc_var_text_att(nc, v_version, "long_name", &
         "model version that corrected the step (-1: degraded, 0: initial state)")
    v_x = nc_var(nc, "X", "double", [d_time, d_member, d_k])
    call nc_var_text_att(nc, v_x, "units", "1")
    call nc_write(nc, v_step, kept)
    call nc_write(nc, v_time, times)
    call nc_write(nc, v_version, all_versions)
    call nc_write(nc, v_x, full)
    write(output_unit, '(a,i0,a,i0,a,i0,a)') "l96_forecast: wrote " // trim(out) // " (", &
         members, " members, ", steps, " steps, ", total_degraded, " degraded steps)"
  end subroutine write_trajectory

  subroutine usage(message)
    character(len=*), intent(in) :: message
    if (rank == 0) write(error_unit, '(a)') "l96_forecast: " // message
    call finish(2)
  end subroutine usage

  subroutine finish(code)
    integer, intent(in) :: code
#ifdef MECS_MPI
    if (code /= 0) call mpi_abort(MPI_COMM_WORLD, code, ierr)
    call mpi_finalize(ierr)
#endif
    if (code == 1) error stop 1
    if (code /= 0) error stop 2
    stop
  end subroutine finish

end program l96_forecast
