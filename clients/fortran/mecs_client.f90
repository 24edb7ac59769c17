! mecs_client: the Fortran 2008 interface of the mecs correction service's C client.
!
! A forecast model opens one handle per run (or per MPI rank), calls mecs_correct at
! every step with its own arrays, and closes the handle at the end:
!
!   use mecs_client
!   type(mecs_handle) :: h
!   call mecs_open(h, "http://127.0.0.1:8000", "l96", status, policy="zero", &
!                  state_shape=[36], dtype=MECS_FP32)
!   call mecs_correct(h, x, c, status)        ! x(36, members), c the same shape
!   call mecs_close(h)
!
! Array layout. A Fortran array is column-major: x(n1, ..., nr, m) is, in memory,
! the C array [m][nr]...[n1]. The service's state of one member is C order
! [d1][d2]...[dr] in the order of the model metadata's "dims" (after "batch"), so
! a Fortran array holds it with the dimensions reversed: x(dr, ..., d1, members).
! For Lorenz-96 ("dims": batch, k) that is x(k, members); for a gridded model
! ("dims": batch, channel, lat, lon) it is x(lon, lat, channel, members). Arrays are
! passed to the service without a copy when they are contiguous (a whole array or
! a slice over the last dimension); a strided section is copied in and out by the
! compiler, which is correct and slower. `state_shape` at open is one member's
! shape in this Fortran order, shape(x(..., 1)), and is checked against the model.
!
! Every call sets `status`: MECS_OK (0), MECS_DEGRADED (1, the policy filled the
! correction: still usable) or a negative MECS_E_* code; mecs_error_message(h)
! says what went wrong.
module mecs_client
  use, intrinsic :: iso_c_binding
  implicit none
  private

  integer, parameter, public :: MECS_OK = 0, MECS_DEGRADED = 1
  integer, parameter, public :: MECS_E_ARGUMENT = -1, MECS_E_UNAVAILABLE = -2, &
       MECS_E_REJECTED = -3, MECS_E_UNAUTHORIZED = -4, MECS_E_FORBIDDEN = -5, &
       MECS_E_NOT_FOUND = -6, MECS_E_MISMATCH = -7, MECS_E_PROTOCOL = -8, &
       MECS_E_TLS = -9, MECS_E_MEMORY = -10, MECS_E_STATE = -11
  integer, parameter, public :: MECS_FP32 = 1, MECS_FP64 = 2
  integer, parameter, public :: MECS_POLICY_RAISE = 0, MECS_POLICY_ZERO = 1, &
       MECS_POLICY_LAST = 2

  !> One connection to one model; not shared between threads.
  type, public :: mecs_handle
     type(c_ptr) :: ptr = c_null_ptr
     character(len=512) :: local_error = ""
  end type mecs_handle

  public :: mecs_open, mecs_correct, mecs_close, mecs_set_policy, mecs_error_message, &
       mecs_status_name, mecs_degraded_steps, mecs_failures, mecs_calls, mecs_failovers, &
       mecs_model_version, mecs_last_version, mecs_circuit_open, mecs_state_size, &
       mecs_live, mecs_ready

  interface
     function c_new() bind(C, name="mecs_new") result(p)
       import :: c_ptr
       type(c_ptr) :: p
     end function c_new
     function c_set(c, name, value) bind(C, name="mecs_set") result(rc)
       import :: c_ptr, c_char, c_int
       type(c_ptr), value :: c
       character(kind=c_char), intent(in) :: name(*), value(*)
       integer(c_int) :: rc
     end function c_set
     function c_connect(c) bind(C, name="mecs_connect") result(rc)
       import :: c_ptr, c_int
       type(c_ptr), value :: c
       integer(c_int) :: rc
     end function c_connect
     function c_correct(c, state, dtype, batch, dt, corr) bind(C, name="mecs_correct") result(rc)
       import :: c_ptr, c_int, c_int64_t, c_double
       type(c_ptr), value :: c, state, corr
       integer(c_int), value :: dtype
       integer(c_int64_t), value :: batch
       real(c_double), value :: dt
       integer(c_int) :: rc
     end function c_correct
     subroutine c_close(c) bind(C, name="mecs_close")
       import :: c_ptr
       type(c_ptr), value :: c
     end subroutine c_close
     function c_set_policy(c, policy) bind(C, name="mecs_set_policy") result(rc)
       import :: c_ptr, c_int
       type(c_ptr), value :: c
       integer(c_int), value :: policy
       integer(c_int) :: rc
     end function c_set_policy
     function c_error_message(c) bind(C, name="mecs_error_message") result(p)
       import :: c_ptr
       type(c_ptr), value :: c
       type(c_ptr) :: p
     end function c_error_message
     function c_status_name(s) bind(C, name="mecs_status_name") result(p)
       import :: c_ptr, c_int
       integer(c_int), value :: s
       type(c_ptr) :: p
     end function c_status_name
     function c_degraded_steps(c) bind(C, name="mecs_degraded_steps") result(v)
       import :: c_ptr, c_long_long
       type(c_ptr), value :: c
       integer(c_long_long) :: v
     end function c_degraded_steps
     function c_failures(c) bind(C, name="mecs_failures") result(v)
       import :: c_ptr, c_long_long
       type(c_ptr), value :: c
       integer(c_long_long) :: v
     end function c_failures
     function c_failovers(c) bind(C, name="mecs_failovers") result(v)
       import :: c_ptr, c_long_long
       type(c_ptr), value :: c
       integer(c_long_long) :: v
     end function c_failovers
     function c_calls(c) bind(C, name="mecs_calls") result(v)
       import :: c_ptr, c_long_long
       type(c_ptr), value :: c
       integer(c_long_long) :: v
     end function c_calls
     function c_model_version(c) bind(C, name="mecs_model_version") result(v)
       import :: c_ptr, c_long
       type(c_ptr), value :: c
       integer(c_long) :: v
     end function c_model_version
     function c_last_version(c) bind(C, name="mecs_last_version") result(v)
       import :: c_ptr, c_long
       type(c_ptr), value :: c
       integer(c_long) :: v
     end function c_last_version
     function c_circuit_open(c) bind(C, name="mecs_circuit_open") result(v)
       import :: c_ptr, c_int
       type(c_ptr), value :: c
       integer(c_int) :: v
     end function c_circuit_open
     function c_live(c) bind(C, name="mecs_live") result(v)
       import :: c_ptr, c_int
       type(c_ptr), value :: c
       integer(c_int) :: v
     end function c_live
     function c_ready(c) bind(C, name="mecs_ready") result(v)
       import :: c_ptr, c_int
       type(c_ptr), value :: c
       integer(c_int) :: v
     end function c_ready
     function c_state_size(c) bind(C, name="mecs_state_size") result(v)
       import :: c_ptr, c_int64_t
       type(c_ptr), value :: c
       integer(c_int64_t) :: v
     end function c_state_size
     function c_state_rank(c) bind(C, name="mecs_state_rank") result(v)
       import :: c_ptr, c_int
       type(c_ptr), value :: c
       integer(c_int) :: v
     end function c_state_rank
     function c_state_dim(c, i) bind(C, name="mecs_state_dim") result(v)
       import :: c_ptr, c_int, c_int64_t
       type(c_ptr), value :: c
       integer(c_int), value :: i
       integer(c_int64_t) :: v
     end function c_state_dim
     function c_strlen(s) bind(C, name="strlen") result(n)
       import :: c_ptr, c_size_t
       type(c_ptr), value :: s
       integer(c_size_t) :: n
     end function c_strlen
  end interface

  !> The correction for a state (one member) or a batch (members last).
  interface mecs_correct
     module procedure correct_r4_1, correct_r4_2, correct_r4_3, correct_r4_4, correct_r4_5
     module procedure correct_r8_1, correct_r8_2, correct_r8_3, correct_r8_4, correct_r8_5
  end interface mecs_correct

contains

  function c_string(s) result(out)
    character(len=*), intent(in) :: s
    character(kind=c_char, len=len_trim(s) + 1) :: out
    out = trim(s) // c_null_char
  end function c_string

  function f_string(p) result(out)
    type(c_ptr), intent(in) :: p
    character(len=:), allocatable :: out
    character(kind=c_char), pointer :: chars(:)
    integer :: i, n
    if (.not. c_associated(p)) then
       out = ""
       return
    end if
    n = int(c_strlen(p))
    call c_f_pointer(p, chars, [n])
    allocate(character(len=n) :: out)
    do i = 1, n
       out(i:i) = chars(i)
    end do
  end function f_string

  subroutine set_option(h, name, value, status)
    type(mecs_handle), intent(inout) :: h
    character(len=*), intent(in) :: name, value
    integer, intent(inout) :: status
    if (status /= MECS_OK) return
    status = c_set(h%ptr, c_string(name), c_string(value))
  end subroutine set_option

  function real_text(x) result(s)
    real(c_double), intent(in) :: x
    character(len=32) :: s
    write(s, '(es24.16e3)') x
    s = adjustl(s)
  end function real_text

  function int_text(i) result(s)
    integer, intent(in) :: i
    character(len=24) :: s
    write(s, '(i0)') i
  end function int_text

  !> Open a connection to `model` at `url`, check the model against what the caller
  !> expects and pin its version (see the module's notes for `state_shape`).
  !> `options` takes any further "name=value;..." of the C client (mecs_client.h).
  !> `group` and `group_size`: the timestep group of callers that step together (MPI
  !> ranks: group_size = the communicator's size), batched by the service as one.
  subroutine mecs_open(h, url, model, status, policy, version, follow_latest, timeout, &
       retries, failure_threshold, cooldown, state_shape, dtype, dims, fields, units, &
       dt_unit, api_key_file, ca_file, options, group, group_size)
    type(mecs_handle), intent(inout) :: h
    character(len=*), intent(in) :: url, model
    integer, intent(out) :: status
    character(len=*), intent(in), optional :: policy, dims, fields, units, dt_unit, &
         api_key_file, ca_file, options, group
    integer, intent(in), optional :: version, retries, failure_threshold, dtype, group_size
    integer, intent(in), optional :: state_shape(:)
    logical, intent(in), optional :: follow_latest
    real(c_double), intent(in), optional :: timeout, cooldown
    character(len=:), allocatable :: text
    integer :: i, k, n
    h%local_error = ""
    if (c_associated(h%ptr)) call c_close(h%ptr)
    h%ptr = c_new()
    if (.not. c_associated(h%ptr)) then
       status = MECS_E_MEMORY
       h%local_error = "out of memory"
       return
    end if
    status = MECS_OK
    call set_option(h, "url", url, status)
    call set_option(h, "model", model, status)
    if (present(policy)) call set_option(h, "policy", policy, status)
    if (present(version)) call set_option(h, "version", int_text(version), status)
    if (present(follow_latest)) then
       if (follow_latest) call set_option(h, "follow_latest", "1", status)
    end if
    if (present(timeout)) call set_option(h, "timeout", real_text(timeout), status)
    if (present(cooldown)) call set_option(h, "cooldown", real_text(cooldown), status)
    if (present(retries)) call set_option(h, "retries", int_text(retries), status)
    if (present(group)) call set_option(h, "group", group, status)
    if (present(group_size)) call set_option(h, "group_size", int_text(group_size), status)
    if (present(failure_threshold)) &
         call set_option(h, "failure_threshold", int_text(failure_threshold), status)
    if (present(dtype)) then
       if (dtype == MECS_FP64) then
          call set_option(h, "expect_dtype", "FP64", status)
       else
          call set_option(h, "expect_dtype", "FP32", status)
       end if
    end if
    if (present(state_shape)) then  ! Fortran order in, the service's (reversed) out
       text = ""
       n = size(state_shape)
       do i = n, 1, -1
          text = text // trim(int_text(state_shape(i)))
          if (i > 1) text = text // ","
       end do
       call set_option(h, "expect_shape", text, status)
    end if
    if (present(dims)) call set_option(h, "expect_dims", dims, status)
    if (present(fields)) call set_option(h, "expect_fields", fields, status)
    if (present(units)) call set_option(h, "expect_units", units, status)
    if (present(dt_unit)) call set_option(h, "dt_unit", dt_unit, status)
    if (present(api_key_file)) call set_option(h, "api_key_file", api_key_file, status)
    if (present(ca_file)) call set_option(h, "ca_file", ca_file, status)
    if (present(options)) then  ! "name=value;name=value"
       i = 1
       do while (i <= len_trim(options) .and. status == MECS_OK)
          k = index(options(i:), ";")
          if (k == 0) k = len_trim(options) - i + 2
          text = adjustl(options(i:i + k - 2))
          n = index(text, "=")
          if (len_trim(text) > 0) then
             if (n == 0) then
                status = MECS_E_ARGUMENT
                h%local_error = "option '" // trim(text) // "' is not name=value"
             else
                call set_option(h, text(:n - 1), text(n + 1:), status)
             end if
          end if
          i = i + k
       end do
    end if
    if (status == MECS_OK) status = c_connect(h%ptr)
  end subroutine mecs_open

  !> An empty array cannot be passed to C (C_LOC needs one of non-zero size): refused here.
  logical function empty(h, nstate, ncorr, status)
    type(mecs_handle), intent(inout) :: h
    integer, intent(in) :: nstate, ncorr
    integer, intent(out) :: status
    empty = nstate == 0 .or. ncorr == 0
    status = MECS_OK
    if (empty) then
       status = MECS_E_ARGUMENT
       h%local_error = "mecs_correct: an empty state or correction array"
    end if
  end function empty

  !> Check a Fortran array against the model's state and call the C client.
  subroutine correct_ptr(h, pstate, pcorr, dtype, shp, nstate, ncorr, status, dt)
    type(mecs_handle), intent(inout) :: h
    type(c_ptr), intent(in) :: pstate, pcorr
    integer, intent(in) :: dtype, shp(:)
    integer(c_int64_t), intent(in) :: nstate, ncorr
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    integer(c_int64_t) :: per, batch
    integer :: r, i
    real(c_double) :: step
    h%local_error = ""
    if (.not. c_associated(h%ptr)) then
       status = MECS_E_STATE
       h%local_error = "mecs_correct before mecs_open"
       return
    end if
    per = c_state_size(h%ptr)
    if (per <= 0) then
       status = MECS_E_STATE
       h%local_error = "mecs_correct on a handle whose mecs_open failed"
       return
    end if
    if (ncorr /= nstate) then
       status = MECS_E_ARGUMENT
       write(h%local_error, '(a,i0,a,i0,a)') "mecs_correct: the correction array has ", &
            ncorr, " values, the state ", nstate
       return
    end if
    if (mod(nstate, per) /= 0 .or. nstate == 0) then
       status = MECS_E_ARGUMENT
       write(h%local_error, '(a,i0,a,i0,a)') "mecs_correct: the state array has ", nstate, &
            " values, not a whole number of states of ", per, " values"
       return
    end if
    batch = nstate / per
    r = c_state_rank(h%ptr)
    if (size(shp) == r .or. size(shp) == r + 1) then  ! dims reversed against the model's
       do i = 1, r
          if (shp(i) /= c_state_dim(h%ptr, int(r - i, c_int))) then
             status = MECS_E_ARGUMENT
             write(h%local_error, '(a,i0,a,i0,a,i0,a)') "mecs_correct: dimension ", i, &
                  " of the state array is ", shp(i), ", the model's is ", &
                  c_state_dim(h%ptr, int(r - i, c_int)), " (Fortran arrays hold the service's dims reversed)"
             return
          end if
       end do
       if (size(shp) == r .and. batch /= 1) then
          status = MECS_E_ARGUMENT
          h%local_error = "mecs_correct: internal error: one state of the wrong size"
          return
       end if
    end if
    step = 0
    if (present(dt)) step = dt
    status = c_correct(h%ptr, pstate, int(dtype, c_int), batch, step, pcorr)
  end subroutine correct_ptr

  subroutine correct_r4_1(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_float), intent(in), target, contiguous :: state(:)
    real(c_float), intent(out), target, contiguous :: correction(:)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP32, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r4_1

  subroutine correct_r4_2(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_float), intent(in), target, contiguous :: state(:, :)
    real(c_float), intent(out), target, contiguous :: correction(:, :)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP32, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r4_2

  subroutine correct_r4_3(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_float), intent(in), target, contiguous :: state(:, :, :)
    real(c_float), intent(out), target, contiguous :: correction(:, :, :)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP32, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r4_3

  subroutine correct_r4_4(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_float), intent(in), target, contiguous :: state(:, :, :, :)
    real(c_float), intent(out), target, contiguous :: correction(:, :, :, :)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP32, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r4_4

  subroutine correct_r4_5(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_float), intent(in), target, contiguous :: state(:, :, :, :, :)
    real(c_float), intent(out), target, contiguous :: correction(:, :, :, :, :)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP32, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r4_5

  subroutine correct_r8_1(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_double), intent(in), target, contiguous :: state(:)
    real(c_double), intent(out), target, contiguous :: correction(:)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP64, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r8_1

  subroutine correct_r8_2(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_double), intent(in), target, contiguous :: state(:, :)
    real(c_double), intent(out), target, contiguous :: correction(:, :)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP64, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r8_2

  subroutine correct_r8_3(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_double), intent(in), target, contiguous :: state(:, :, :)
    real(c_double), intent(out), target, contiguous :: correction(:, :, :)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP64, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r8_3

  subroutine correct_r8_4(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_double), intent(in), target, contiguous :: state(:, :, :, :)
    real(c_double), intent(out), target, contiguous :: correction(:, :, :, :)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP64, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r8_4

  subroutine correct_r8_5(h, state, correction, status, dt)
    type(mecs_handle), intent(inout) :: h
    real(c_double), intent(in), target, contiguous :: state(:, :, :, :, :)
    real(c_double), intent(out), target, contiguous :: correction(:, :, :, :, :)
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: dt
    if (empty(h, size(state), size(correction), status)) return
    call correct_ptr(h, c_loc(state), c_loc(correction), MECS_FP64, shape(state), &
         size(state, kind=c_int64_t), size(correction, kind=c_int64_t), status, dt)
  end subroutine correct_r8_5

  !> Close the connection and free the handle (safe to call twice).
  subroutine mecs_close(h)
    type(mecs_handle), intent(inout) :: h
    if (c_associated(h%ptr)) call c_close(h%ptr)
    h%ptr = c_null_ptr
  end subroutine mecs_close

  subroutine mecs_set_policy(h, policy, status)
    type(mecs_handle), intent(inout) :: h
    integer, intent(in) :: policy
    integer, intent(out) :: status
    status = c_set_policy(h%ptr, int(policy, c_int))
  end subroutine mecs_set_policy

  !> What went wrong last, as text to print.
  function mecs_error_message(h) result(message)
    type(mecs_handle), intent(in) :: h
    character(len=:), allocatable :: message
    if (len_trim(h%local_error) > 0) then
       message = trim(h%local_error)
    else
       message = f_string(c_error_message(h%ptr))
    end if
  end function mecs_error_message

  function mecs_status_name(status) result(name)
    integer, intent(in) :: status
    character(len=:), allocatable :: name
    name = f_string(c_status_name(int(status, c_int)))
  end function mecs_status_name

  integer(c_long_long) function mecs_degraded_steps(h)
    type(mecs_handle), intent(in) :: h
    mecs_degraded_steps = c_degraded_steps(h%ptr)
  end function mecs_degraded_steps

  integer(c_long_long) function mecs_failures(h)
    type(mecs_handle), intent(in) :: h
    mecs_failures = c_failures(h%ptr)
  end function mecs_failures

  !> Moves to another endpoint of a comma-separated url, in all.
  integer(c_long_long) function mecs_failovers(h)
    type(mecs_handle), intent(in) :: h
    mecs_failovers = c_failovers(h%ptr)
  end function mecs_failovers

  integer(c_long_long) function mecs_calls(h)
    type(mecs_handle), intent(in) :: h
    mecs_calls = c_calls(h%ptr)
  end function mecs_calls

  !> The pinned version (or, when following the latest, the last answer's).
  integer function mecs_model_version(h)
    type(mecs_handle), intent(in) :: h
    mecs_model_version = int(c_model_version(h%ptr))
  end function mecs_model_version

  integer function mecs_last_version(h)
    type(mecs_handle), intent(in) :: h
    mecs_last_version = int(c_last_version(h%ptr))
  end function mecs_last_version

  logical function mecs_circuit_open(h)
    type(mecs_handle), intent(in) :: h
    mecs_circuit_open = c_circuit_open(h%ptr) /= 0
  end function mecs_circuit_open

  integer(c_int64_t) function mecs_state_size(h)
    type(mecs_handle), intent(in) :: h
    mecs_state_size = c_state_size(h%ptr)
  end function mecs_state_size

  logical function mecs_live(h)
    type(mecs_handle), intent(in) :: h
    mecs_live = c_live(h%ptr) /= 0
  end function mecs_live

  logical function mecs_ready(h)
    type(mecs_handle), intent(in) :: h
    mecs_ready = c_ready(h%ptr) /= 0
  end function mecs_ready

end module mecs_client
